"""CPU time of each thread of an extraction, by thread name, for this tree and another, printed as one JSON object:
where `bench/store_ab.py`'s extraction figure goes (decode pool, main thread, Zarr's I/O threads and event loop,
the writer thread).

    .venv/bin/python bench/extract_threads.py --base /tmp/base [--images 256] [--no-write]

Each tree in a fresh process (as `bench/store_ab.py` runs it): one untimed `extract_chunks` with the stand-in
encoder, then two timed, while every thread's user + system time is read from /proc/self/task every 50 ms.
`--no-write`: `FeatureStore.write_chunk` does nothing, which leaves everything but the store's writes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent


def thread_times() -> dict[str, tuple[str, float]]:
    """native thread id -> (Python thread name, or "native" for threads Python did not start; CPU seconds)."""
    names = {str(t.native_id): t.name for t in threading.enumerate()}
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[tid] = (names.get(tid, "native"), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return out


def measure(tree: Path, images: int, no_write: bool, workdir: Path) -> dict:
    sys.path[:0] = [str(tree), str(HERE)]
    import store_ab

    if no_write:
        from pipeline.store import FeatureStore

        FeatureStore.write_chunk = lambda self, *args, **kwargs: None
    store_ab.measure(tree, "extract", images, 2, workdir)  # untimed: imports, first touches
    before, seen, done = thread_times(), {}, threading.Event()

    def poll() -> None:
        while not done.is_set():
            seen.update(thread_times())
            time.sleep(0.05)

    poller = threading.Thread(target=poll, name="poll", daemon=True)
    poller.start()
    rates = [store_ab.measure(tree, "extract", images, 2, workdir)["extract_images_per_s"] for _ in range(2)]
    done.set()
    poller.join()
    seen.update(thread_times())
    cpu = Counter()
    for tid, (name, seconds) in seen.items():
        if name != "poll":  # pool threads are numbered: one row per pool
            cpu[re.sub(r"[_-]?\d+$", "", name)] += seconds - before.get(tid, (name, 0.0))[1]
    return {"extract_images_per_s": rates, "thread_cpu_s": {k: round(v, 2) for k, v in cpu.most_common()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", help="the tree to compare with (a checkout of the earlier commit)")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--workdir", default="/tmp/spaceclip-store-ab")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(Path(args.child), args.images, args.no_write, Path(args.workdir))))
        return
    if not args.base:
        ap.error("--base is required")
    out = {}
    for name, tree in (("base", Path(args.base).resolve()), ("new", HERE.parent)):
        cmd = [sys.executable, __file__, "--child", str(tree), "--images", str(args.images), "--workdir",
               str(Path(args.workdir) / name)] + (["--no-write"] if args.no_write else [])
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tree)}
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
        if result.returncode:
            sys.exit(f"{tree} failed:\n{result.stderr[-3000:]}")
        out[name] = json.loads(result.stdout.strip().splitlines()[-1])
    print(json.dumps({**out, "images": args.images, "no_write": args.no_write}, indent=1))


if __name__ == "__main__":
    main()
