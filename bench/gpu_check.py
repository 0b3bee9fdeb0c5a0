"""Every CUDA path of the pipeline in one run, printed as one JSON object (the pipeline's functions, no Prefect).

    bash scripts/gpu-check.sh                                  # on a GPU machine with no network (carried wheels)
    .venv/bin/python bench/gpu_check.py --device cpu --frames 16 --encoder tiny-clip-64 --batches 2 4  # on a CPU

On a synthetic KITTI (`--frames` train frames, a quarter as many test frames) and a random CLIP ViT-B/16
(`clip-vit-b16-random`), each check in its own try, so that one failure does not hide the others:

- `extraction`: the test split extracted on the device at fp32 and bf16 autocast, each at two batch sizes, against
  the same extraction on the CPU at fp32: max |token difference| per layer (the stored float16 values) and
  images/s (the whole extraction: decode, forward, writes).
- `loader`: the train store's batches on the device, streamed and resident, against the batches the host finishes
  (`cache_device=cpu` on the CPU): `torch.equal` of every tensor of two epochs.
- `syncs`: host-device synchronisations in one training step (`torch.cuda.set_sync_debug_mode("warn")`, warnings
  counted), after a warm-up step (on the CPU the steps run and nothing is counted).
- `shared_pass`: two variants trained in one pass against each trained alone: checkpoint bytes equal, else the
  max weight difference (on CUDA bilinear interpolation's backward is not deterministic).
- `resume`: a training killed after its first epoch and resumed, against an uninterrupted one.
- `two_passes`: two trainings at once on one device, as two processes, against each alone; wall time against one.
- `evaluate`: the test split evaluated on the device against the CPU: max |ΔAbsRel| and |ΔRMSE| over variants.
- `predict`: `SpaceClip.from_pretrained(..., device)` + `predict_paths` on test frames against the CPU's depth.
- `importer`: a trained decoder written in the authors' checkpoint format, imported, and run on the device
  against the source checkpoint.

`--only NAME ...` runs some checks; `resume`, `two_passes`, `evaluate`, `predict` and `importer` compare with or
read the runs that `shared_pass` trains alone. Top-level keys: `device`, `gpu`, `torch`, `cuda`, `python`,
`frames`, `encoder`, `render_s`, `extract_all_s`, `seconds`, `checks` ({name: {"ok": bool, "seconds", figures...,
or "error" and "traceback"}}), `failed` (names), `ok`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def derive(cfg, *overrides):
    from pipeline.config import config_from_dict, dump_config

    return config_from_dict(dump_config(cfg), overrides=list(overrides))


def base_config(tmp: Path, frames: int, encoder: str, device: str, batch: int, epochs: int):
    from pipeline.config import config_from_dict

    data = tmp / "data"
    return config_from_dict({
        "name": "gpu-check", "sweep": "check",
        "data": {"layout": "kitti", "image_root": str(data / "raw"), "depth_root": str(data / "gt"),
                 "train_split": str(data / "splits/eigen_train_files_with_gt.txt"),
                 "test_split": str(data / "splits/eigen_test_files_with_gt.txt"),
                 "val_fraction": 0.2, "synth": {"train": frames, "test": max(4, frames // 4), "seed": 0}},
        "encoder": {"name": encoder, "batch_size": batch, "device": device},
        "views": {"crop_size": [176, 352], "views_per_image": 1},
        "cache": {"root": str(tmp / "cache" / "main"), "chunk_size": 16, "target_size": [88, 176]},
        "decoder": {"channels": [64, 32, 16, 8]},
        "train": {"epochs": epochs, "batch_size": 8, "out_dir": str(tmp / "runs"), "device": device,
                  "cache_device": "stream", "variants": ["baseline", "full"], "parallel": 1,
                  "deterministic": True},  # the shared-pass and resume identities below hold only with it on CUDA
        "eval": {"out_dir": str(tmp / "results"), "batch_size": 8, "qualitative": 0},
        "dask": {"processes": False, "n_workers": 1},
    }, source="gpu_check")


def max_token_diff(a, b) -> dict:
    """max |a - b| per layer of two stores' tokens (float32), and the reference's max |token|."""
    import torch

    ra, rb = a.read(slice(0, a.n), layers=a.layers), b.read(slice(0, b.n), layers=b.layers)
    out = {f"L{k}": float((ra["tokens"][k].float() - rb["tokens"][k].float()).abs().max()) for k in a.layers}
    out["global"] = float((ra["global"].float() - rb["global"].float()).abs().max())
    out["ref_max_abs"] = float(torch.stack([t.float().abs().max() for t in rb["tokens"].values()]).max())
    return out


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def same_batches(a, b) -> bool:
    import numpy as np
    import torch

    for x, y in zip(a, b, strict=True):
        index = x.index.cpu().numpy() if isinstance(x.index, torch.Tensor) else np.asarray(x.index)
        if not (np.array_equal(index, np.asarray(y.index)) and torch.equal(x.flipped.cpu(), y.flipped)):
            return False
        for k, t in y.features["tokens"].items():
            if not torch.equal(x.features["tokens"][k].cpu().view(torch.int16), t.view(torch.int16)):
                return False
        if not torch.equal(x.features["global"].cpu(), y.features["global"]) or not torch.equal(x.depth.cpu(), y.depth):
            return False
    return True


def run_files_diff(a: Path, b: Path) -> dict:
    """Whether two run folders' last checkpoints are byte-identical, and the max |weight difference|."""
    from safetensors.torch import load_file

    fa, fb = a / "last" / "model.safetensors", b / "last" / "model.safetensors"
    wa, wb = load_file(fa), load_file(fb)
    diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wb)
    return {"identical": fa.read_bytes() == fb.read_bytes(), "max_weight_diff": diff}


# ---- the checks ---------------------------------------------------------------------------------------------------
def check_extraction(cfg, device, tmp: Path, batches: tuple[int, int], frames_test: int) -> dict:
    from pipeline.extract import extract_splits
    from pipeline.layout import RunContext

    def extract(tag: str, *overrides) -> tuple[object, float]:
        c = derive(cfg, f"cache.root={tmp / 'cache' / tag}", *overrides)
        t0 = time.perf_counter()
        extract_splits(c, ("test",))
        sync(device)
        return RunContext.of(c).open_store("test"), time.perf_counter() - t0

    ref, ref_s = extract("cpu-fp32", "encoder.device=cpu", "encoder.dtype=float32", f"encoder.batch_size={batches[0]}")
    out = {"cpu_fp32_images_per_s": round(frames_test / ref_s, 2)}
    worst = {}
    for dtype in ("float32", "bfloat16"):
        for bs in batches:
            tag = f"{device.type}-{dtype}-b{bs}"
            extract(tag + "-warm", f"encoder.device={device}", f"encoder.dtype={dtype}",
                    f"encoder.batch_size={bs}")  # first use: kernels, autotuning, allocator
            store, s = extract(tag, f"encoder.device={device}", f"encoder.dtype={dtype}",
                               f"encoder.batch_size={bs}")
            diff = max_token_diff(store, ref)
            out[tag] = {"images_per_s": round(frames_test / s, 2),
                        "max_token_diff": max(v for k, v in diff.items() if k != "ref_max_abs"),
                        "per_array": {k: round(v, 6) for k, v in diff.items()}}
            worst[dtype] = max(worst.get(dtype, 0.0), out[tag]["max_token_diff"])
    # fp32 on the device against fp32 on the CPU: float rounding (TF32 if enabled); bf16: its 8-bit mantissa
    out["ok"] = worst["float32"] < 0.05 * max(1.0, diff["ref_max_abs"]) and worst["bfloat16"] < 0.5 * max(
        1.0, diff["ref_max_abs"])
    return out


def check_loader(cfg, device) -> dict:
    from pipeline.layout import RunContext
    from pipeline.loader import CachedBatches

    store = RunContext.of(cfg).open_store("train")
    layers = cfg.decoder.layers
    kw = dict(batch_size=cfg.train.batch_size, flip_p=0.5, seed=3, shuffle_window=2)
    host = CachedBatches(store, layers, cache_device="cpu", device="cpu", **kw)
    want = [list(host.epoch(e)) for e in (0, 1)]
    out = {"batches": sum(len(w) for w in want)}
    modes = {"stream": dict(cache_device="stream"), "resident": dict(cache_device=device.type)}
    for name, extra in modes.items():
        loader = CachedBatches(store, layers, device=device, **{**kw, **extra})
        out[name] = {"mode": loader.mode,
                     "equal": all(same_batches(list(loader.epoch(e)), want[e]) for e in (0, 1))}
    out["ok"] = all(out[n]["equal"] for n in modes)
    return out


def check_syncs(cfg, device) -> dict:
    """Syncs of one training step on CUDA; on the CPU the same step runs and nothing is counted."""
    import torch

    from pipeline.layout import RunContext
    from pipeline.loader import CachedBatches
    from pipeline.train import loss_kwargs_for, make_optimizer, train_step
    from spaceclip.decoder import SpaceClipDecoder

    cuda = device.type == "cuda"
    store = RunContext.of(cfg).open_store("train")
    out = {}
    for variant in ("baseline", "full"):
        model = SpaceClipDecoder(variant, width=int(store.attrs["width"]), **cfg.decoder.kwargs()).to(device).train()
        loader = CachedBatches(store, model.layers, batch_size=cfg.train.batch_size, cache_device="stream",
                               device=device)
        # The whole epoch first: the loader's reading thread has stopped, so only the step's syncs are counted
        # (warnings are caught process-wide).
        warm, batch = list(loader.epoch(0))[:2]
        opt = make_optimizer(model, cfg.train, device)  # fused on a GPU: the skip decision stays there
        kw = loss_kwargs_for(cfg)
        train_step(model, opt, warm, kw, cfg.train.grad_clip)  # warm-up: first-use allocations
        sync(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                loss, taken = train_step(model, opt, batch, kw, cfg.train.grad_clip)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message) for w in caught if "synchron" in str(w.message).lower()]
        out[variant] = {"syncs": len(syncs) if cuda else None, "loss": float(loss), "taken": bool(taken),
                        "first": sorted(set(m[:160] for m in syncs))[:5]}
    # a figure, not a pass/fail (the step-syncs change brings it down); the steps themselves must have run
    # a fused AdamW step and masked-sum losses: no host read at all on CUDA (train_step's docstring)
    out["ok"] = all(out[v]["taken"] and (not cuda or out[v]["syncs"] == 0) for v in ("baseline", "full"))
    if not cuda:
        out["skipped"] = "sync counting is CUDA's (torch.cuda.set_sync_debug_mode); the steps ran"
    return out


def check_shared_pass(cfg) -> dict:
    from pipeline.train import train_variant, train_variants

    shared = derive(cfg, "sweep=shared")
    runs = train_variants(shared, ["baseline", "full"], resume=False)
    out = {}
    for v in ("baseline", "full"):
        alone = train_variant(derive(cfg, f"sweep=alone-{v}"), v, resume=False)
        out[v] = run_files_diff(runs[v].run_dir, alone.run_dir)
    out["identical"] = all(out[v]["identical"] for v in ("baseline", "full"))
    out["ok"] = out["identical"]  # train.deterministic is on (base_config): bit-identical on CUDA too
    return out


def check_resume(cfg) -> dict:
    from pipeline.train import read_history, train_variant

    class Killed(Exception):
        pass

    def kill(row):
        if row["epoch"] == 1:
            raise Killed

    c = derive(cfg, "sweep=resume")
    try:
        train_variant(c, "full", resume=False, on_epoch=kill)
        return {"ok": False, "error": "the kill after epoch 1 did not happen"}
    except Killed:
        pass
    resumed = train_variant(c, "full", resume=True)
    out = run_files_diff(resumed.run_dir, Path(cfg.train.out_dir) / "alone-full" / "full")
    out["epochs"] = len(read_history(resumed.run_dir / "history.csv"))
    out["ok"] = out["epochs"] == cfg.train.epochs and out["identical"]
    return out


TRAIN_ONE = """
import sys, time
sys.path.insert(0, {root!r})
from pipeline.config import load_config
from pipeline.train import train_variant
t0 = time.perf_counter()
train_variant(load_config(sys.argv[1]), sys.argv[2], resume=False)
print(time.perf_counter() - t0)
"""


def check_two_passes(cfg, tmp: Path) -> dict:
    import yaml

    from pipeline.config import dump_config

    paths = []
    for v in ("baseline", "full"):
        path = tmp / f"two-{v}.yaml"
        path.write_text(yaml.safe_dump(dump_config(derive(cfg, f"sweep=two-{v}"))))
        paths.append((path, v))
    code = TRAIN_ONE.format(root=str(ROOT))
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", code, str(p), v], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for p, v in paths]
    results = [p.communicate() for p in procs]
    wall = time.perf_counter() - t0
    out = {"wall_s": round(wall, 2)}
    for (path, v), proc, (stdout, stderr) in zip(paths, procs, results):
        if proc.returncode != 0:
            out[v] = {"error": stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {proc.returncode}"}
            continue
        out[v] = {"train_s": round(float(stdout.strip().splitlines()[-1]), 2),
                  **run_files_diff(Path(cfg.train.out_dir) / f"two-{v}" / v,
                                   Path(cfg.train.out_dir) / f"alone-{v}" / v)}
    out["ok"] = all("error" not in out[v] for _, v in paths)
    return out


def check_evaluate(cfg, device) -> dict:
    from pipeline.evaluate import evaluate_run

    got = {}
    for dev in dict.fromkeys([device.type, "cpu"]):
        t0 = time.perf_counter()
        summary = evaluate_run(derive(cfg, f"train.device={dev}", "sweep=alone-full"), ["full"]).summary()
        got[dev] = (summary.set_index("variant"), time.perf_counter() - t0)
    (a, sa), (b, sb) = got[device.type], got["cpu"]
    out = {"abs_rel": float(a.loc["full", "abs_rel"]), "d_abs_rel": float(abs(a.loc["full", "abs_rel"] -
                                                                               b.loc["full", "abs_rel"])),
           "d_rmse": float(abs(a.loc["full", "rmse"] - b.loc["full", "rmse"])),
           "seconds_device": round(sa, 2), "seconds_cpu": round(sb, 2)}
    out["ok"] = out["d_abs_rel"] < 1e-3
    return out


def check_predict(cfg, device, tmp: Path) -> dict:
    import numpy as np

    from PIL import Image

    from pipeline.datasets import read_split
    from pipeline.predict import PredictOptions, predict_paths
    from spaceclip.model import SpaceClip

    ckpt = Path(cfg.train.out_dir) / "alone-full" / "full" / "best"
    images = [s.image_path for s in read_split(cfg.data, "test")][:8]
    runs = {}
    for dev in dict.fromkeys([device.type, "cpu"]):
        model = SpaceClip.from_pretrained(ckpt, device=dev)
        model.predict([Image.open(images[0]).convert("RGB")])  # first use
        t0 = time.perf_counter()
        result = predict_paths(model, images, tmp / f"predict-{dev}", PredictOptions(batch_size=4), progress=False)
        sync(model.device)
        runs[dev] = (time.perf_counter() - t0, result.n_ok)
    (s, n) = runs[device.type]
    # the float32 depth each device wrote (<stem>_depth.npy)
    pairs = [(x, tmp / "predict-cpu" / x.name) for x in sorted((tmp / f"predict-{device.type}").glob("*.npy"))]
    rel = max((float(np.abs(np.load(x) - np.load(y)).max() / max(1e-6, float(np.abs(np.load(y)).max())))
               for x, y in pairs), default=float("nan"))
    out = {"images": n, "images_per_s": round(n / s, 2), "depth_maps_compared": len(pairs), "max_rel_depth_diff": rel}
    out["ok"] = n == len(images) and len(pairs) == n and rel < 0.05
    return out


def check_importer(cfg, device, tmp: Path) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from pipeline.datasets import read_split
    from pipeline.importer import _their_name, import_checkpoint, ours_key
    from spaceclip.model import SpaceClip

    ckpt = Path(cfg.train.out_dir) / "alone-full" / "full" / "best"
    source = SpaceClip.from_pretrained(ckpt, device=device)
    state = {}
    for k, v in source.decoder.state_dict().items():
        theirs = _their_name(k)
        if ours_key(theirs) != k:
            return {"ok": False, "error": f"no authors' name for {k} (got {theirs!r})"}
        state[theirs] = v.cpu().clone()
    state.update({f"clip_vision_model.{k}": v.cpu().clone() for k, v in source.encoder.model.state_dict().items()})
    path = tmp / "authors" / "best_checkpoint.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "epoch": 0}, path)
    report = import_checkpoint(path, tmp / "authors" / "imported", encoder=cfg.encoder.name)
    imported = SpaceClip.from_pretrained(tmp / "authors" / "imported", device=device)
    image = [Image.open(s.image_path).convert("RGB") for s in read_split(cfg.data, "test")][:2]
    a, b = imported.predict(image), source.predict(image)
    diff = max(float(np.abs(x - y).max()) for x, y in zip(a, b))
    scale = max(float(np.abs(y).max()) for y in b)
    # the same weights on the same device: equal, up to a kernel choice between two model instances
    return {"ok": diff <= 1e-5 * max(1.0, scale), "variant": report.variant,
            "encoder_checked": report.encoder_checked, "max_depth_diff": diff}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu (a rehearsal)")
    ap.add_argument("--frames", type=int, default=128, help="synthetic KITTI train frames (test: a quarter)")
    ap.add_argument("--encoder", default="clip-vit-b16-random")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs=2, default=(8, 32), help="the two extraction batch sizes")
    ap.add_argument("--only", nargs="*", help="run only these checks (extraction, loader, ...)")
    ap.add_argument("--json", help="also write the JSON here")
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temporary folder, removed)")
    args = ap.parse_args()
    started = time.perf_counter()
    report: dict = {"device": args.device, "frames": args.frames, "encoder": args.encoder, "checks": {}}
    tmp_ctx = contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="gpu-check-")
    with tmp_ctx as tmp_name:
        tmp = Path(tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            import torch

            from pipeline import datasets, synth
            from pipeline.extract import extract_splits

            device = torch.device(args.device)
            report.update(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                          gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
            cfg = base_config(tmp, args.frames, args.encoder, str(device), args.batches[0], args.epochs)
            t0 = time.perf_counter()
            synth.ensure(cfg.data)
            report["render_s"] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            extract_splits(cfg)  # the train, val and test stores every later check reads
            report["extract_all_s"] = round(time.perf_counter() - t0, 2)
        except Exception as err:  # nothing else can run: say why
            report.update(ok=False, failed=["setup"], error=f"{type(err).__name__}: {err}",
                          traceback=traceback.format_exc(limit=-4))
            return finish(report, started, args.json)
        n_test = len(datasets.read_split(cfg.data, "test"))
        checks = {
            "extraction": lambda: check_extraction(cfg, device, tmp, tuple(args.batches), n_test),
            "loader": lambda: check_loader(cfg, device),
            "syncs": lambda: check_syncs(cfg, device),
            "shared_pass": lambda: check_shared_pass(cfg),
            "resume": lambda: check_resume(cfg),
            "two_passes": lambda: check_two_passes(cfg, tmp),
            "evaluate": lambda: check_evaluate(cfg, device),
            "predict": lambda: check_predict(cfg, device, tmp),
            "importer": lambda: check_importer(cfg, device, tmp),
        }
        for name, run in checks.items():
            if args.only and name not in args.only:
                continue
            t0 = time.perf_counter()
            try:
                result = run()
            except Exception as err:
                result = {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000],
                          "traceback": traceback.format_exc(limit=-3)[-2000:]}
            result["seconds"] = round(time.perf_counter() - t0, 2)
            report["checks"][name] = result
            print(f"gpu_check: {name} {'ok' if result['ok'] else 'FAILED'} ({result['seconds']} s)", file=sys.stderr)
    report["failed"] = [n for n, r in report["checks"].items() if not r["ok"]]
    report["ok"] = not report["failed"]
    return finish(report, started, args.json)


def finish(report: dict, started: float, path: str | None) -> int:
    report["seconds"] = round(time.perf_counter() - started, 2)
    if path:
        Path(path).write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(json.dumps(report, default=str))  # one line: the end of a device call's output holds it whole
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
