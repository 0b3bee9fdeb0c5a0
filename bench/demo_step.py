"""Seconds, CPU seconds and page faults per training step of one demo variant, on one torch thread, with the
demo's cache in memory, printed as one JSON object: the figures behind `pipeline.devices.reuse_freed_memory`.

    .venv/bin/python bench/demo_step.py [full] [--set key=value ...]
    MALLOC_TRIM_THRESHOLD_=65536 .venv/bin/python bench/demo_step.py full            # as a Dask nanny starts it
    MALLOC_TRIM_THRESHOLD_=65536 .venv/bin/python bench/demo_step.py full --reuse    # then reuse_freed_memory()

Needs the demo's train cache (`spaceclip extract --config demo`). Two untimed steps, then 12 timed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.devices import reuse_freed_memory  # noqa: E402
from pipeline.layout import RunContext  # noqa: E402
from pipeline.train import build_sources, loss_kwargs_for, make_optimizer, train_step  # noqa: E402
from spaceclip.decoder import SpaceClipDecoder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("variant", nargs="?", default="full")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--reuse", action="store_true", help="call reuse_freed_memory() first")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.reuse:
        reuse_freed_memory()
    cfg = load_config("demo", args.overrides)
    ctx = RunContext.of(cfg)
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    sources = build_sources(ctx, tuple(cfg.decoder.layers_of(args.variant)), cpu)
    model = SpaceClipDecoder(args.variant, width=ctx.encoder_identity["width"], head_bias=20.0,
                             **cfg.decoder.kwargs())
    optimizer = make_optimizer(model, cfg.train, cpu)
    batches, loss_kwargs = list(sources.train.epoch(0)), loss_kwargs_for(cfg)
    for batch in batches[:2]:
        train_step(model, optimizer, batch, loss_kwargs, 1.0)
    faults, cpu_s, wall = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time(), time.perf_counter()
    for batch in batches[2:14]:
        train_step(model, optimizer, batch, loss_kwargs, 1.0)
    n = len(batches[2:14])
    print(json.dumps({"variant": args.variant, "s_per_step": round((time.perf_counter() - wall) / n, 3),
                      "cpu_s_per_step": round((time.process_time() - cpu_s) / n, 3),
                      "faults_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) // n}))


if __name__ == "__main__":
    main()
