"""The `spaceclip` command. Each subcommand is a thin call into `pipeline` or a flow in `flows`.

Every subcommand that reads a config takes `--config NAME|FILE`, `--sweep NAME` and repeatable `--set key=value`.
Imports of heavy modules happen inside the subcommands so `spaceclip --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="demo", help="config name (demo, kitti, nyu) or YAML path [demo]")
    p.add_argument("--sweep", default=None, help="sweep overlay: configs/sweeps/<name>.yaml or a path")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=3 (repeatable)",
    )
    p.add_argument("--grid", dest="overrides", action="append", type=_grid_arg, metavar="KEY=V1,V2",
                   help="add a grid axis: train every value of a config key, e.g. --grid train.lr=1e-2,3e-3 "
                   "(repeatable; list values bracketed: --grid decoder.semantic_layers=[12,9,6,3],[11,8,5,2])")


def _grid_arg(text: str) -> str:
    """`--grid KEY=V1,V2` -> the override `grid.KEY=[V1, V2]` (pipeline/grid.py), checked as it is parsed."""
    from pipeline.grid import GridError, grid_override

    try:
        return grid_override(text)
    except GridError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_cache_args(p: argparse.ArgumentParser) -> None:
    """Flags of the commands that extract: each one a `--set` of its config key."""
    p.add_argument("--ignore-disk-space", dest="overrides", action="append_const", const="cache.check_space=false",
                   help="extract even when the stores do not fit the free space of cache.root's file system")
    p.add_argument("--verify-cache", dest="overrides", action="append_const", const="cache.verify=full",
                   help="decode every chunk of a reused store first (default: a quick check of its file sizes)")


def config_from_args(args):
    from pipeline.config import load_config

    return load_config(args.config, args.overrides, sweep=args.sweep)


def add_seed_args(p: argparse.ArgumentParser, partial: bool = False) -> None:
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="train/evaluate N seeds per variant: train.seed, train.seed + 1, ... (= --set train.seeds=[...])")
    if partial:
        p.add_argument("--allow-partial", action="store_true",
                       help="evaluate a sweep whose seeds are not all trained (= --set eval.allow_partial=true)")


def seed_overrides(args) -> None:
    """`--seeds N` and `--allow-partial` as the overrides they stand for, appended to `args.overrides`."""
    if getattr(args, "seeds", None) is not None:
        if args.seeds < 1:
            from pipeline.config import ConfigError

            raise ConfigError(f"--seeds {args.seeds}: give at least 1 seed")
        first = config_from_args(args).train.seed
        args.overrides.append(f"train.seeds={list(range(first, first + args.seeds))}")
    if getattr(args, "allow_partial", False):
        args.overrides.append("eval.allow_partial=true")


def variants_from_args(args) -> list[str] | None:
    """`--variants a,b` -> ["a", "b"]; None (the config's `train.variants`) when not given."""
    return [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None


FLOW_COMMANDS = {"extract", "train", "evaluate", "run"}


@contextlib.contextmanager
def prefect_api():
    """Run flows against PREFECT_API_URL when it is set; otherwise start one temporary local server for this
    command and export its URL, so that Dask worker processes report to it instead of each starting their own."""
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    server.start(timeout=int(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]))
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    finally:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)  # send the last log lines before the server goes away
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def cmd_version(args) -> int:
    import platform

    from spaceclip import __version__

    print(f"spaceclip {__version__}")
    if args.verbose:
        import importlib.metadata as md

        from pathlib import Path

        from packaging.specifiers import SpecifierSet
        from packaging.utils import canonicalize_name

        lock = Path(getattr(args, "lock", None) or Path(__file__).resolve().parent.parent / "constraints.txt")
        tested: dict[str, str] = {}
        if lock.is_file():
            for line in lock.read_text().splitlines():
                name, sep, version = line.split("#")[0].strip().partition("==")
                if sep:
                    tested[canonicalize_name(name)] = version.strip()

        from pipeline.layout import package_versions

        def installed(pkg: str) -> str | None:
            try:
                return md.version(pkg)
            except md.PackageNotFoundError:
                return None

        def matches(version: str | None, pin: str) -> bool:  # ==2.13.0 also holds for 2.13.0+cpu, as for pip
            return version is not None and SpecifierSet(f"=={pin}").contains(version, prereleases=True)

        print(f"python {platform.python_version()}")
        for pkg, version in package_versions(("dask", "prefect", "pandas")).items():
            if pkg == "spaceclip":
                continue
            pin = tested.get(canonicalize_name(pkg))
            mark = "" if pin is None or matches(version, pin) else f"  (tested: {pin})"
            print(f"{pkg} {version or '(not installed)'}{mark}")
        if not tested:
            print(f"tested versions: no lock file at {lock} (an installed copy, not a checkout)")
            return 0
        differ = [(name, installed(name), pin) for name, pin in sorted(tested.items())
                  if not matches(installed(name), pin)]
        if not differ:
            print(f"tested versions: all {len(tested)} packages pinned in {lock} are installed at those versions")
        else:
            print(f"tested versions: {len(differ)} of {len(tested)} packages differ from {lock} "
                  "(`pip install -c constraints.txt -e .[test,onnx]` installs the tested ones):")
            for name, version, pin in differ:
                print(f"  {name} {version or '(not installed)'}, tested {pin}")
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
        report = FeatureStore.open(path).verify(quick=args.quick)
        status = "ok" if report["ok"] else "FAILED"
        print(f"{status}  {path}: {report['done']}/{report['n']} samples done, {report['skipped']} skipped, "
              f"{report['done_chunks']}/{report['chunks']} chunks, complete={report['complete']}, "
              f"fingerprint {report['fingerprint']}")
        for problem in report["problems"]:
            print(f"  - {problem}")
        if report["damaged_chunks"] or report["damaged_index"]:
            print(f"  damaged chunks {report['damaged_chunks']}" + (f", index columns {report['damaged_index']}"
                  if report["damaged_index"] else "") + ": `spaceclip extract` with the store's config extracts "
                  "exactly those again")
        failed += not report["ok"]
    return 1 if failed else 0


def cmd_data_synth(args) -> int:
    import time
    from pathlib import Path

    from pipeline.datasets import split_statistics
    from pipeline.synth import synthesize

    start = time.perf_counter()
    out = Path(args.out or f"data/demo/{args.layout}")
    paths = synthesize(args.layout, out, train=args.train, test=args.test, seed=args.seed)
    print(f"synthetic {args.layout} dataset (seed {args.seed}) written to {out} in {time.perf_counter() - start:.1f} s")
    for split in ("train", "test"):
        stats = split_statistics(paths[f"{split}_split"], paths["image_root"], paths["depth_root"], args.layout)
        unit = "drives" if args.layout == "kitti" else "scenes"
        no_gt = f", {stats['no_gt']} with GT None" if stats["no_gt"] else ""
        print(f"  {split:5s} {stats['frames']:4d} frames in {stats['groups']} {unit}{no_gt}: {paths[f'{split}_split']}")
    print(f"  images: {paths['image_root']}\n  depth:  {paths['depth_root']}")
    return 0


def cmd_data_check(args) -> int:
    from pipeline.datasets import check_dataset

    cfg = config_from_args(args)
    report = check_dataset(cfg.data, decode=not args.quick, workers=args.workers)
    for line in report.summary_lines(examples=args.examples):
        print(line)
    if not report.ok and cfg.data.synth is not None:
        print("note: data.synth is set, so `spaceclip run` / `extract` would generate this synthetic dataset")
    fits = True
    if report.ok:  # what extraction would write, and whether it fits (`pipeline.extract.space_needed`)
        from pipeline.errors import SpaceClipError
        from pipeline.extract import DiskSpaceError, check_space, space_needed
        from spaceclip.encoder import EncoderLoadError

        try:
            need, _ = space_needed(cfg)
            for line in need.lines():
                print(line)
            check_space(need, cfg)
        except DiskSpaceError as err:
            print(f"cache: {err}")
            fits = False
        except (SpaceClipError, EncoderLoadError) as err:  # the grid and width come from the encoder
            print(f"cache: size not estimated ({err})")
    return 0 if report.ok and fits else 1


def cmd_train(args) -> int:
    from flows.train import train_decoders

    runs = train_decoders(config=args.config, overrides=args.overrides, sweep=args.sweep,
                          variants=variants_from_args(args), resume=not args.no_resume, progress=True)
    for variant, path in runs.items():
        print(f"{variant}\t{path}")
    return 0


def print_results(paths: dict[str, str]) -> None:
    """The table itself, then where everything is."""
    from pathlib import Path

    print(Path(paths["table_md"]).read_text())
    print(f"results in {paths['results']}/")
    for name in ("table_md", "table_tex", "summary", "per_image", "pairwise", "skipped", "protocol", "qualitative",
                 "training_curves", "grid_csv", "grid_png"):
        if name in paths:
            print(f"  {name:16s}{paths[name]}")


def cmd_evaluate(args) -> int:
    from flows.evaluate import evaluate

    paths = evaluate(config=args.config, overrides=args.overrides, sweep=args.sweep,
                     variants=variants_from_args(args), progress=True)
    print_results(paths)
    return 0


def cmd_run(args) -> int:
    from flows.paper_table import paper_table

    paths = paper_table(config=args.config, overrides=args.overrides, sweep=args.sweep,
                        variants=variants_from_args(args), dask_address=args.dask_address, progress=True)
    print_results(paths)
    return 0


def cmd_predict(args) -> int:
    from pathlib import Path

    from pipeline.layout import resolve_device
    from pipeline.predict import PredictOptions, predict_paths, summary_lines
    from spaceclip.encoder import EncoderLoadError
    from spaceclip.model import SpaceClip

    try:
        opts = PredictOptions(
            colormap=args.colormap, depth_range=tuple(args.range) if args.range else None,
            side_by_side=args.side_by_side, pointcloud=args.pointcloud, focal=args.focal, cx=args.cx, cy=args.cy,
            ply_binary=not args.ply_ascii, png_scale=args.png_scale, batch_size=args.batch_size,
        )
        model = SpaceClip.from_pretrained(args.checkpoint, device=resolve_device(args.device), encoder=args.encoder)
    except (ValueError, EncoderLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = predict_paths(model, args.paths, args.out, opts, progress=True)
    for line in summary_lines(result, Path(args.out), opts):
        print(line)
    return 1 if result.failed else 0


def cmd_export_onnx(args) -> int:
    from pipeline.export import ExportError, export_onnx
    from spaceclip.encoder import EncoderLoadError

    try:
        report = export_onnx(args.checkpoint, args.out, decoder_only=args.decoder_only, encoder=args.encoder,
                             rtol=args.rtol, opset=args.opset)
    except (ExportError, ValueError, EncoderLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0 if report.ok else 1


def cmd_import(args) -> int:
    from pipeline.importer import import_checkpoint

    report = import_checkpoint(args.path, args.out, variant=args.variant, weights=args.weights,
                               encoder=args.encoder, train_config=args.train_config, force=args.force)
    print(report.summary())
    return 0


def cmd_serve(args) -> int:
    from flows.serve import serve

    return serve(port=args.port)


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
    q = data_sub.add_parser("check", help="read the dataset tree against its split files: per split what is "
                            "present, missing or unreadable, with split-file lines (exit 1 if anything is)")
    add_config_args(q)
    q.add_argument("--quick", action="store_true", help="existence and headers only, no full decode")
    q.add_argument("--examples", type=int, default=5, help="problems listed per split [5]")
    q.add_argument("--workers", type=int, default=4, help="reader threads [4]")
    q.set_defaults(func=cmd_data_check)

    p = sub.add_parser("extract", help="run the frozen encoder once over train/val/test into Zarr feature stores")
    add_config_args(p)
    p.add_argument("--splits", default="train,val,test", help="comma-separated splits [train,val,test]")
    p.add_argument("--dask-address", default=None, help="an existing Dask scheduler (tcp://host:8786)")
    add_cache_args(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("train", help="train decoder variants from the feature cache (the train-decoders flow)")
    add_config_args(p)
    p.add_argument("--variants", default=None, help="comma-separated variants [the config's train.variants]")
    p.add_argument("--no-resume", action="store_true", help="retrain from scratch, overwriting existing runs")
    add_seed_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="full-image metrics on the test split, tables and pictures (evaluate flow)")
    add_config_args(p)
    p.add_argument("--variants", default=None, help="comma-separated variants [the config's train.variants]")
    add_seed_args(p, partial=True)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("run", help="the main job: extract -> train -> evaluate -> table + pictures (paper-table)")
    add_config_args(p)
    p.add_argument("--variants", default=None, help="comma-separated variants [the config's train.variants]")
    p.add_argument("--dask-address", default=None, help="an existing Dask scheduler (tcp://host:8786) for extraction and training")
    add_cache_args(p)
    add_seed_args(p, partial=True)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("cache", help="feature-store tools")
    cache_sub = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    q = cache_sub.add_parser("verify", help="check every done chunk is present and readable, and counts match")
    q.add_argument("paths", nargs="+", metavar="PATH")
    q.add_argument("--quick", action="store_true", help="the check extraction makes of a store it reuses: chunk "
                   "file sizes, no decode of the features (default: every chunk decoded, its CRC checked)")
    q.set_defaults(func=cmd_cache_verify)
    p = sub.add_parser("predict", help="depth for your own images: 16-bit PNG, .npy, colour PNG [, side-by-side, PLY]")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (recursive) or globs")
    p.add_argument("--checkpoint", required=True, help="decoder checkpoint folder (model.safetensors + config.json)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--encoder", default=None, help="encoder name/folder instead of the one the checkpoint records")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [auto]")
    p.add_argument("--colormap", default="turbo", help="matplotlib colormap; near = its high end [turbo]")
    p.add_argument("--range", nargs=2, type=float, metavar=("MIN", "MAX"),
                   help="fixed colour range in metres, for comparable pictures [per-image 2nd-98th percentiles]")
    p.add_argument("--side-by-side", action="store_true", help="also write <stem>_side.png: input | depth")
    p.add_argument("--pointcloud", action="store_true", help="also write <stem>.ply (needs --focal)")
    p.add_argument("--focal", type=float, default=None, help="focal length in pixels of the input image")
    p.add_argument("--cx", type=float, default=None, help="principal point x in pixels [(W-1)/2]")
    p.add_argument("--cy", type=float, default=None, help="principal point y in pixels [(H-1)/2]")
    p.add_argument("--ply-ascii", action="store_true", help="ASCII PLY instead of binary little-endian")
    p.add_argument("--png-scale", type=float, default=256.0, help="16-bit PNG value = metres x this [256]")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass [8]")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a trained model to other runtimes")
    export_sub = p.add_subparsers(dest="export_command", metavar="FORMAT", required=True)
    q = export_sub.add_parser("onnx", help="ONNX (full image->depth, or decoder-only), checked with onnxruntime")
    q.add_argument("--checkpoint", required=True, help="decoder checkpoint folder")
    q.add_argument("--out", required=True, help="output .onnx file")
    q.add_argument("--decoder-only", action="store_true", help="cached token grids + global vector -> depth")
    q.add_argument("--encoder", default=None, help="encoder name/folder instead of the one the checkpoint records")
    q.add_argument("--rtol", type=float, default=1e-4, help="max error / max |depth| allowed vs PyTorch [1e-4]")
    q.add_argument("--opset", type=int, default=None, help="ONNX opset [the exporter's default]")
    q.set_defaults(func=cmd_export_onnx)

    p = sub.add_parser("import", help="convert a checkpoint of the authors' train.py (taewan2002/SPACE-CLIP, "
                       "best_checkpoint.pt) into a checkpoint folder for predict / evaluate / SpaceClip")
    p.add_argument("path", metavar="PATH.pt", help="the authors' checkpoint (read with torch.load weights_only=True)")
    p.add_argument("--out", required=True, help="checkpoint folder to write, e.g. runs/authors/full/best")
    p.add_argument("--variant", default=None, choices=["baseline", "film", "structural", "full"],
                   help="expected variant (checked against the keys) [read from the checkpoint]")
    p.add_argument("--weights", default="auto", choices=["auto", "model", "ema"],
                   help="'model', or a separate EMA state dict ('ema', ...) [auto: EMA when present]")
    p.add_argument("--encoder", default=None,
                   help="encoder it was trained with [the config's clip_model_name, else openai/clip-vit-base-patch16]")
    p.add_argument("--train-config", default=None, metavar="YAML",
                   help="the authors' training YAML: layer indices, dropout, clip_model_name [paper defaults]")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("serve", help="local Prefect server + deployments of every flow for demo/kitti/nyu "
                       "(`prefect deployment run 'extract-features/demo' --watch`); Ctrl-C stops it all")
    p.add_argument("--port", type=int, default=None,
                   help="server port on 127.0.0.1 [4200 if free, else any free port]; ignored when "
                   "PREFECT_API_URL answers")
    p.set_defaults(func=cmd_serve)
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
    # The temporary server an in-process flow run starts needs 10-15 s on 2 busy cores; Prefect waits only 20.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    # Dask's scheduler/nanny INFO lines would drown the progress bar and the flow's own log lines.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    from pipeline.errors import one_line, user_errors  # a config, dataset, store, run, checkpoint or encoder to fix

    # SIGTERM takes the Ctrl-C path: the temporary Prefect server and the Dask cluster are stopped by the `finally`
    # blocks on the way out instead of being orphaned. What was written stays (stores resume, runs resume).
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if args.command in FLOW_COMMANDS:
            seed_overrides(args)
            from pipeline.grid import points

            points(config_from_args(args))  # a bad --set or grid point fails now, not after the server has started
        with prefect_api() if args.command in FLOW_COMMANDS else contextlib.nullcontext():
            return int(args.func(args) or 0)
    except (*user_errors(), FileNotFoundError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished chunks and epochs are kept; the same command resumes", file=sys.stderr)
        return 130


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
