"""Room on the disk: what a feature store takes, from its spec alone, and whether the stores of a run fit.

`estimate_bytes` follows the layout `pipeline.store` creates (one file per chunk and array, whole blocks per file
and folder); `space_needed` / `check_space` compare what a run's stores still need with the free space under
`cache.root`, and `ensure_space` refuses a run that cannot fit before any store is created.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import Config
from pipeline.layout import SPLITS, RunContext
from pipeline.planning import Plan, plan_split, store_spec
from pipeline.store import IDENTITY_AUG, INDEX_FIELDS, SOURCES, FeatureStore, StoreError, StoreSpec, local_path

log = logging.getLogger(__name__)


# ---- what a store costs on disk, from its spec alone --------------------------------------------------------------
BLOCK = 4096  # the allocation unit of the usual local file systems (ext4, xfs, tmpfs pages): a file takes whole blocks
# A compressed feature array is counted at no less than this fraction of its raw bytes: the mantissa bits of fp16 /
# bf16 activations are noise that no codec removes (zstd-1 saves ~8 % of fp16 ViT tokens).
MIN_FEATURE_RATIO = 0.5


@dataclass
class SizeEstimate:
    """Bytes a store (or the part of it still to be written) takes on disk, whole blocks per file and folder:
    `low` <= what lands <= `high`. Uncompressed arrays (the features by default) are exact; a compressed array is
    counted at its raw size plus the codec's framing in `high` and at `MIN_FEATURE_RATIO` (features) or nothing
    (targets, flags, index) in `low`. `parts`: {what: (low, high)}."""

    low: int = 0
    high: int = 0
    parts: dict = field(default_factory=dict)

    def add(self, part: str, low: int, high: int) -> None:
        lo, hi = self.parts.get(part, (0, 0))
        self.parts[part] = (lo + low, hi + high)
        self.low += low
        self.high += high

    def __iadd__(self, other: "SizeEstimate") -> "SizeEstimate":
        for part, (lo, hi) in other.parts.items():
            self.add(part, lo, hi)
        return self


def _blocks(nbytes: int | float) -> int:
    return -(-int(nbytes) // BLOCK) * BLOCK


def _frame_bytes(raw: int) -> int:
    """The most a zstd frame (or a blosc buffer) of `raw` bytes takes: a stored (raw) block of up to 128 KiB with a
    3-byte header each, the frame header, the CRC-32C the store appends."""
    return raw + 3 * (raw // (128 << 10) + 1) + 32 + 4


def estimate_bytes(spec: StoreSpec, index: dict[str, np.ndarray] | None = None,
                   chunks: int | None = None) -> SizeEstimate:
    """What `FeatureStore.create(url, spec, index)` and the extraction of its chunks write, from the shapes `_create`
    gives the arrays: every chunk file holds a whole chunk (the last one padded, as Zarr pads an edge chunk), one
    file per chunk and array, in Zarr v3's nested chunk folders (`c/<i>/0/0/0`: ndim - 1 folders a chunk).

    `chunks`: only that many chunks (the pending ones of a partial store, whose index and metadata exist; `index`
    is then None). A chunk of n = chunk_size samples, g x g grid, C channels, L layers:

        tokens/L*  L x n x g x g x C x 2 B + a 4-byte CRC each (twice with mirrored features)
        cls        n x C x 2 B + 4
        depth      n x H x W x 2 B, zstd (sparse LiDAR compresses ~30x: `low` counts none of it)
        done, skipped, skip_reason   n + n + 4n B, zstd"""
    out = SizeEstimate()
    n, g, c, cs = spec.n, spec.grid, spec.width, spec.chunk_size
    n_chunks = -(-n // cs) if chunks is None else chunks
    new = index is not None
    arrays = 0

    def array(part: str, ndim: int, raw: int, min_ratio: float | None, files: int = n_chunks) -> None:
        """`files` chunk files of `raw` bytes each before the codec; min_ratio None: stored raw (+ CRC), exact."""
        nonlocal arrays
        arrays += 1
        folders = files * (ndim - 1) * BLOCK + (3 * BLOCK if new else 0)  # + the array's folder, zarr.json, c/
        if min_ratio is None:
            exact = files * _blocks(raw + 4) + folders
            out.add(part, exact, exact)
        else:
            out.add(part, files * _blocks(max(1, raw * min_ratio)) + folders,
                    files * _blocks(_frame_bytes(raw)) + folders)

    features = MIN_FEATURE_RATIO if spec.compressor != "none" else None
    for _ in range(2 if spec.flipped else 1):
        for _k in spec.layers:
            array("features", 4, cs * g * g * c * 2, features)
        array("features", 2, cs * c * 2, features)
    if spec.target_hw is not None:
        h, w = spec.target_hw
        array("depth targets", 3, cs * h * w * 2, 0.0)
    array("flags", 1, cs, 0.0)  # done
    array("flags", 1, cs, 0.0)  # skipped
    array("flags", 1, cs * 4, 0.0)  # skip_reason: empty strings, longer for skipped samples
    if new:
        for name in INDEX_FIELDS:  # one chunk each
            values = np.asarray(index[name]) if name in index else np.zeros((n, len(IDENTITY_AUG)))
            raw = (sum(len(str(v).encode()) + 4 for v in values) if values.dtype.kind in "UOT" else values.nbytes)
            array("index and metadata", values.ndim, raw, 0.0, files=1)
        for _k in SOURCES:  # (N, 2) int64 each, `record_sources`
            array("index and metadata", 2, n * 16, 0.0, files=1)
        # the store's folder and zarr.json (the attrs: config, versions, fingerprint inputs, indented), and a folder
        # and a zarr.json for each group: tokens/, index/, sources/ (+ flipped/, flipped/tokens/)
        attrs = len(json.dumps(spec.attrs, default=str))
        groups = BLOCK + 2 * BLOCK * (3 + 2 * spec.flipped)
        out.add("index and metadata", groups + _blocks(attrs + 512), groups + _blocks(2 * attrs + 1024))
    return out


def nearest_existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (where a store not yet created will be)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# ---- room on the disk -----------------------------------------------------------------------------------------
class DiskSpaceError(StoreError):
    """The file system of `cache.root` has not the room for the stores still to be extracted."""


@dataclass
class SpaceNeeded:
    """The bytes the stores of a run still need (`estimate_bytes`), and the room where they go."""

    root: str
    where: Path | None  # the existing folder whose file system was asked; None: not a local path
    free: int | None
    splits: dict  # split -> (SizeEstimate, what: "new, N samples" / "K of M chunks to go" / "complete")
    total: SizeEstimate

    @property
    def fits(self) -> bool:
        return self.free is None or self.total.low <= self.free

    def lines(self) -> list[str]:
        out = []
        for split, (est, what) in self.splits.items():
            parts = ", ".join(f"{k} {_size(lo, hi)}" for k, (lo, hi) in est.parts.items() if hi)
            out.append(f"cache {split}: {_size(est.low, est.high)} to write ({what}){': ' + parts if parts else ''}")
        room = "unknown (not a local path)" if self.free is None else f"{_gb(self.free)} free on {self.where}"
        out.append(f"cache total: {_size(self.total.low, self.total.high)} to write under cache.root {self.root}; "
                   f"{room}")
        return out


def _gb(n: int) -> str:
    return _size(n, n)


def _size(low: int, high: int) -> str:
    """"1.20 to 1.45 GB", in GB from 1 GB on, else MB; one figure where both read the same."""
    scale, unit = (1e9, "GB") if high >= 1e9 else (1e6, "MB")
    a, b = f"{low / scale:.2f}", f"{high / scale:.2f}"
    return f"{b} {unit}" if a == b else f"{a} to {b} {unit}"


def check_space(need: SpaceNeeded, cfg: Config) -> None:
    """A `DiskSpaceError` with the numbers and the knobs when the stores cannot fit (`cache.check_space: false`:
    a warning only); a warning when they fit only if the compressed arrays compress."""
    if need.fits:
        if need.free is not None and need.total.high > need.free:
            log.warning("cache.root %s: %s free, the stores need %s: they fit only if their compressed arrays "
                        "compress", need.root, _gb(need.free), _size(need.total.low, need.total.high))
        return
    per = "; ".join(f"{split} {_size(est.low, est.high)}" for split, (est, _) in need.splits.items() if est.high)
    message = (
        f"not enough disk space for the feature cache: extraction would write {_size(need.total.low, need.total.high)}"
        f" ({per}) under cache.root {need.root}, and its file system ({need.where}) has {_gb(need.free)} free. "
        f"Free space there, or set cache.root to a larger file system, or store less: views.views_per_image "
        f"(now {cfg.views.views_per_image}) and cache.layers (now {list(cfg.cache_layers)}) scale it, "
        f"cache.dtype ({cfg.cache.dtype}) takes 2 bytes a value; --ignore-disk-space (cache.check_space=false) "
        "goes on anyway")
    if cfg.cache.check_space:
        raise DiskSpaceError(message)
    log.warning("%s (cache.check_space is false: going on)", message)


def space_needed(ctx: RunContext | Config, splits=SPLITS) -> tuple[SpaceNeeded, dict[str, Plan]]:
    """What the splits' stores still need on disk: a new store all of it (from the split's plan, returned for
    `prepare_store`), a partial one its pending chunks (what is written counts as done), a complete one nothing."""
    ctx = RunContext.of(ctx)
    cfg, plans, per_split, total = ctx.cfg, {}, {}, SizeEstimate()
    for split in splits:
        try:
            store = FeatureStore.open(ctx.store_url(split))
            store = store if store.fingerprint == ctx.fingerprint(split) else None
        except StoreError:
            store = None
        if store is None:
            plan = plans[split] = plan_split(cfg, split)
            spec = store_spec(ctx, split, plan)
            est = estimate_bytes(spec, plan.index)
            what = f"new: {spec.n} samples in {-(-spec.n // spec.chunk_size)} chunks"
        elif store.complete:
            est, what = SizeEstimate(), "complete"
        else:
            pending = len(store.pending_chunks())
            est, what = estimate_bytes(store.spec(), chunks=pending), f"{pending} of {store.n_chunks} chunks to go"
        per_split[split] = (est, what)
        total += est
    folder = local_path(cfg.cache.root)
    where = None if folder is None else nearest_existing(folder)
    free = None if where is None else shutil.disk_usage(where).free
    return SpaceNeeded(cfg.cache.root, where, free, per_split, total), plans


def ensure_space(ctx: RunContext | Config, splits=SPLITS) -> dict[str, Plan]:
    """`space_needed` logged and checked (`check_space`) before any store is created or written; the new splits'
    plans (for `prepare_store`)."""
    need, plans = space_needed(ctx, splits)
    for line in need.lines():
        log.info("%s", line)
    check_space(need, RunContext.of(ctx).cfg)
    return plans
