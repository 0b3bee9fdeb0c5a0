"""The `spaceclip` command. Each subcommand is a thin call into `pipeline` or a flow in `flows`.

Every subcommand that reads a config takes `--config NAME|FILE`, `--sweep NAME` and repeatable `--set key=value`.
Imports of heavy modules happen inside the subcommands so `spaceclip --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="demo", help="config name (demo, kitti, nyu) or YAML path [demo]")
    p.add_argument("--sweep", default=None, help="sweep overlay: configs/sweeps/<name>.yaml or a path")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=3 (repeatable)",
    )


def config_from_args(args):
    from pipeline.config import load_config

    return load_config(args.config, args.overrides, sweep=args.sweep)


def cmd_version(args) -> int:
    import platform

    from spaceclip import __version__

    print(f"spaceclip {__version__}")
    if args.verbose:
        import importlib.metadata as md

        print(f"python {platform.python_version()}")
        for pkg in ("torch", "transformers", "zarr", "numcodecs", "dask", "prefect", "pandas", "numpy"):
            try:
                print(f"{pkg} {md.version(pkg)}")
            except md.PackageNotFoundError:
                print(f"{pkg} (not installed)")
    return 0


def cmd_extract(args) -> int:
    from flows.extract import extract_features

    stores = extract_features(config=args.config, overrides=args.overrides, sweep=args.sweep,
                              splits=args.splits.split(","), dask_address=args.dask_address, progress=True)
    for split, url in stores.items():
        print(f"{split}\t{url}")
    return 0


def cmd_cache_verify(args) -> int:
    from pipeline.store import FeatureStore

    failed = 0
    for path in args.paths:
        report = FeatureStore.open(path).verify()
        status = "ok" if report["ok"] else "FAILED"
        print(f"{status}  {path}: {report['done']}/{report['n']} samples done, {report['skipped']} skipped, "
              f"{report['done_chunks']}/{report['chunks']} chunks, complete={report['complete']}, "
              f"fingerprint {report['fingerprint']}")
        for problem in report["problems"]:
            print(f"  - {problem}")
        failed += not report["ok"]
    return 1 if failed else 0


def cmd_data_synth(args) -> int:
    import time
    from pathlib import Path

    from pipeline.datasets import parse_split_file
    from pipeline.synth import synthesize

    start = time.perf_counter()
    out = Path(args.out or f"data/demo/{args.layout}")
    paths = synthesize(args.layout, out, train=args.train, test=args.test, seed=args.seed)
    print(f"synthetic {args.layout} dataset (seed {args.seed}) written to {out} in {time.perf_counter() - start:.1f} s")
    for split in ("train", "test"):
        samples = parse_split_file(paths[f"{split}_split"], paths["image_root"], paths["depth_root"], args.layout)
        no_gt = sum(s.depth_path is None for s in samples)
        unit = "drives" if args.layout == "kitti" else "scenes"
        print(f"  {split:5s} {len(samples):4d} frames in {len({s.group for s in samples})} {unit}"
              f"{f', {no_gt} with GT None' if no_gt else ''}: {paths[f'{split}_split']}")
    print(f"  images: {paths['image_root']}\n  depth:  {paths['depth_root']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spaceclip",
        description="SPACE-CLIP depth: extract frozen-encoder features once, train decoder ablations from the "
        "cache, evaluate and write paper-style tables.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("version", help="print the version (and dependency versions with -v)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_version)

    # --- subcommands registered by their modules (one line each) ---
    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = data_sub.add_parser("synth", help="write a procedural dataset in the real KITTI / NYU on-disk layout")
    q.add_argument("--layout", choices=["kitti", "nyu"], default="kitti")
    q.add_argument("--out", default=None, help="output folder [data/demo/<layout>]")
    q.add_argument("--train", type=int, default=48, help="train frames [48]")
    q.add_argument("--test", type=int, default=16, help="test frames [16]")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_data_synth)

    p = sub.add_parser("extract", help="run the frozen encoder once over train/val/test into Zarr feature stores")
    add_config_args(p)
    p.add_argument("--splits", default="train,val,test", help="comma-separated splits [train,val,test]")
    p.add_argument("--dask-address", default=None, help="an existing Dask scheduler (tcp://host:8786)")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("cache", help="feature-store tools")
    cache_sub = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    q = cache_sub.add_parser("verify", help="check every done chunk is present and readable, and counts match")
    q.add_argument("paths", nargs="+", metavar="PATH")
    q.set_defaults(func=cmd_cache_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    # Prefect: a project-local home (its SQLite database), no analytics, and our loggers in flow-run logs.
    os.environ.setdefault("PREFECT_HOME", os.path.abspath(".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipeline")
    from pipeline.config import ConfigError
    from pipeline.datasets import DatasetError
    from pipeline.store import StoreError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, DatasetError, StoreError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
