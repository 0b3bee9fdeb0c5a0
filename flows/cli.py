"""The `spaceclip` command. Each subcommand is a thin call into `pipeline` or a flow in `flows`.

Every subcommand that reads a config takes `--config NAME|FILE`, `--sweep NAME` and repeatable `--set key=value`.
Imports of heavy modules happen inside the subcommands so `spaceclip --help` stays fast.
"""

from __future__ import annotations

import argparse
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from pipeline.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
