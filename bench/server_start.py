"""How long a `prefect server start` takes to answer /api/health on a fresh PREFECT_HOME (every migration runs
first) and on a copy of an already migrated database, alternating, printed as one JSON object.

    .venv/bin/python bench/server_start.py [--db .prefect/prefect.db] [--rounds 2]

`--db`: a migrated database to copy (default: the one `scripts/setup.sh` makes). The server's CPU time is its
process tree's user + system time when it first answers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flows.serve import free_port, start_server, stop_process  # noqa: E402


def one(db: Path | None) -> dict:
    home = Path(tempfile.mkdtemp(prefix="server-start-")) / "home"
    home.mkdir()
    if db is not None:
        shutil.copyfile(db, home / "prefect.db")
    t0 = time.perf_counter()
    proc, _ = start_server(free_port(), home)
    healthy_s = time.perf_counter() - t0
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    cpu_s = sum(p.cpu_times().user + p.cpu_times().system for p in tree)
    stop_process(proc.pid)
    shutil.rmtree(home.parent, ignore_errors=True)
    return {"healthy_s": round(healthy_s, 1), "server_cpu_s": round(cpu_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", default=str(Path(__file__).resolve().parent.parent / ".prefect" / "prefect.db"))
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    out: dict[str, list] = {"fresh_home": [], "migrated_copy": []}
    for _ in range(args.rounds):
        out["fresh_home"].append(one(None))
        out["migrated_copy"].append(one(Path(args.db)))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
