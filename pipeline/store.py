"""The Zarr v3 feature store: one store per (dataset, split, fingerprint), read and written through zarr-python.

    tokens/L{k}   (N, g, g, C)  float16, or bfloat16 kept as its uint16 bits (attr `bfloat16_bits`)
    cls           (N, C)        pooled global vector (the encoder's pooler_output), same dtype
    flipped/...   the same two for each view's mirrored image (stores created with `flipped=True`)
    depth         (N, H, W)     uint16 training target, metres x attr `scale`, 0 = invalid (training splits only)
    skipped, skip_reason (N,)   1 and why, where the sample could not be read (`on_error: skip`)
    done          (N,)          uint8, written *after* the chunk's data: a chunk is finished iff all its flags are 1
    index/*       per-sample id, paths, focal, original size, view (k, top, left, h, w), group, line, view_aug
    sources/*     (N, 2) size and mtime of each sample's image and depth file when it was extracted

Every data array is chunked along N only, with one chunk length: the unit of extraction, of reading and of
ownership (a writer claims a chunk first: `claim_chunk`). Every data chunk ends in Zarr's `crc32c` codec, checked
by every read and by `verify`. A store is created in a hidden sibling folder and renamed into place. One part per
concern: `_Creation`, `_Claims`, `_Writes`, `_Reads`, `_Verification`; one hand-written read and write of the
uncompressed feature chunks (`_raw_chunk`, `_put_raw`), each kept for a measured figure (docs/design.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import glob
import os
import shutil
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import crc32c
import numpy as np
import psutil
import torch
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec
from zarr.core.sync import sync

from pipeline import claims
from pipeline.datasets import decode_depth, encode_depth
from pipeline.devices import usable_cores
from pipeline.errors import DiskFullError, SpaceClipError, is_disk_full

INDEX_FIELDS = ("id", "image_path", "depth_path", "focal", "orig_hw", "view", "group", "line", "view_aug")
# view_aug (N, 6) float64: each view's augmentation (rotation angle in degrees, gamma, brightness, gain R, G, B),
# the identity (0, 1, 1, 1, 1, 1) for a view without any. Stores written before it existed read as the identity.
VIEW_AUG_COLUMNS = ("view_angle", "view_gamma", "view_brightness", "view_gain_r", "view_gain_g", "view_gain_b")
IDENTITY_AUG = (0.0, 1.0, 1.0, 1.0, 1.0, 1.0)
_INDEX_COLUMNS = {"orig_hw": ("orig_h", "orig_w"), "view": ("view_k", "view_top", "view_left", "view_h", "view_w"),
                  "view_aug": VIEW_AUG_COLUMNS}  # the index arrays read as several DataFrame columns
SOURCES = ("image", "depth")
# Zarr skips writing a chunk equal to the fill value unless told otherwise; `verify` relies on every done chunk's
# file existing, so every write goes through arrays opened with this.
_WRITE_ALL = {"write_empty_chunks": True}


class StoreError(SpaceClipError, RuntimeError):
    """A feature store is missing, incomplete or does not match what the caller expects."""


def flipped_key(name: str) -> str:
    """Where the mirrored image's copy of a data array lives (`tokens/L3` -> `flipped/tokens/L3`)."""
    return f"flipped/{name}"


def layer_key(k: int) -> str:
    return f"tokens/L{k}"


def local_path(url: str) -> Path | None:
    """The folder of a store on the local file system, or None for another fsspec URL (s3://, gs://, ...)."""
    if url.startswith("file://"):
        return Path(url.removeprefix("file://"))
    return None if "://" in url else Path(url)


def disk_full_error(err: BaseException, url: str, doing: str) -> DiskFullError | None:
    """A one-line `DiskFullError` for a write of `doing` into the store at `url` that failed with ENOSPC, else None."""
    if not is_disk_full(err, local_path(url)):
        return None
    return DiskFullError(
        f"disk full while {doing} in {url} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}): "
        "nothing half-written is kept; free space on that file system (or set cache.root to a larger one) and run "
        "the same command again: finished chunks are kept and only the missing ones are extracted")


def _compressors(name: str, level: int) -> list:
    """The bytes-to-bytes codecs of a data array: the compressor, then a CRC-32C of the chunk (checked by Zarr on
    every read), so that a changed byte is found by `verify` and by every reader, not only a truncation."""
    if name == "none":
        return [Crc32cCodec()]
    if name == "zstd":
        return [ZstdCodec(level=level), Crc32cCodec()]
    if name == "blosc-zstd":  # byte shuffle groups the fp16 exponent bytes together
        return [BloscCodec(cname="zstd", clevel=level, shuffle=BloscShuffle.shuffle, typesize=2), Crc32cCodec()]
    raise StoreError(f"unknown compressor {name!r}; choose none, zstd or blosc-zstd")


def _raw_layout(arr: zarr.Array) -> int | None:
    """The size of every chunk file of an array stored as its little-endian values then their CRC-32C (what
    `_raw_chunk` reads and `_put_raw` writes); None for another layout (Zarr reads and writes it)."""
    codecs = arr.metadata.codecs
    if len(codecs) != 2 or not isinstance(codecs[1], Crc32cCodec) or codecs[0].to_dict().get(
            "configuration", {}).get("endian", "little") != "little":
        return None
    return int(np.prod(arr.chunks)) * arr.dtype.itemsize + 4


_PAGE = 4096


@dataclass
class StoreSpec:
    n: int
    layers: tuple[int, ...]
    grid: int
    width: int
    dtype: str = "float16"  # or "bfloat16"
    chunk_size: int = 32
    compressor: str = "none"  # of the feature arrays; the depth targets use it too, or zstd-1 when it is none
    level: int = 1
    target_hw: tuple[int, int] | None = None  # None: no depth targets (test splits)
    depth_scale: float = 256.0
    flipped: bool = False  # also store the features of each view's mirrored image (views.flip = "extract")
    attrs: dict = field(default_factory=dict)


def _chunk_key(arr: zarr.Array, c: int) -> str:
    """Where chunk `c` of `arr` lives, relative to the array's folder."""
    return arr.metadata.chunk_key_encoding.encode_chunk_key((c,) + (0,) * (arr.ndim - 1))


class _Creation:
    """Creating a store (atomically, by rename) and opening one."""

    created: bool = False  # True on the object `create` returned when this caller made the store

    @classmethod
    def create(cls, url: str, spec: StoreSpec, index: dict[str, np.ndarray]) -> "FeatureStore":
        """A new store at `url`, on a local disk written into a hidden sibling folder and renamed into place: when
        another process created it meanwhile (two runs of one config), that store is returned (`created` False)."""
        folder = local_path(url)
        if folder is None:  # fsspec URLs have no atomic rename: written in place
            store = cls._create(zarr.open_group(url, mode="w"), url, spec, index)
            store.created = True
            return store
        host = socket.gethostname()
        tmp = folder.with_name(f".{folder.name}.creating-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        folder.parent.mkdir(parents=True, exist_ok=True)
        for left in folder.parent.glob(f".{glob.escape(folder.name)}.creating-{glob.escape(host)}-*"):
            pid = left.name.rsplit("-", 2)[-2]  # a creator of this host killed before its rename
            if pid.isdigit() and not psutil.pid_exists(int(pid)):
                shutil.rmtree(left, ignore_errors=True)
        try:
            cls._create(zarr.open_group(str(tmp), mode="w"), str(tmp), spec, index)
            os.rename(tmp, folder)  # atomic; fails when `folder` holds a store (a non-empty folder)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if full := disk_full_error(err, url, "creating the store"):
                raise full from None
            if not folder.is_dir():
                raise
            try:  # created by another process meanwhile
                store = cls.open(url, mode="r+")
            except StoreError:
                raise StoreError(f"{url} exists but is not a readable feature store; delete it and run again") from None
            if store.fingerprint != spec.attrs.get("fingerprint"):
                raise StoreError(f"{url} already holds a store with fingerprint {store.fingerprint}, not "
                                 f"{spec.attrs.get('fingerprint')}; delete it or choose another cache.root") from None
            return store
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        store = cls.open(url, mode="r+")
        store.created = True
        return store

    @classmethod
    def _create(cls, group: zarr.Group, url: str, spec: StoreSpec, index: dict[str, np.ndarray]) -> "FeatureStore":
        index = {"view_aug": np.tile(np.asarray(IDENTITY_AUG), (spec.n, 1)), **index}  # default: un-augmented views
        if missing := [f for f in INDEX_FIELDS if f not in index]:
            raise StoreError(f"index for {url} lacks fields {missing}")
        for name, values in index.items():
            if len(values) != spec.n:
                raise StoreError(f"index field {name!r} has {len(values)} rows, expected {spec.n}")
        n, g, c, cs = spec.n, spec.grid, spec.width, spec.chunk_size
        features = dict(dtype="uint16" if spec.dtype == "bfloat16" else spec.dtype, fill_value=0,
                        compressors=_compressors(spec.compressor, spec.level))
        # n == 0 (every sample skipped) still makes a valid, empty store.
        for prefix in ["", flipped_key("")] if spec.flipped else [""]:
            for k in spec.layers:
                group.create_array(prefix + layer_key(k), shape=(n, g, g, c), chunks=(cs, g, g, c), **features,
                                   attributes={"bfloat16_bits": spec.dtype == "bfloat16"})
            group.create_array(prefix + "cls", shape=(n, c), chunks=(cs, c), **features)
        if spec.target_hw is not None:
            h, w = spec.target_hw
            # Sparse targets (LiDAR: ~8 % of pixels valid) compress ~30x and decode in well under a millisecond.
            codec = spec.compressor if spec.compressor != "none" else "zstd"
            group.create_array("depth", shape=(n, h, w), chunks=(cs, h, w), dtype="uint16", fill_value=0,
                               compressors=_compressors(codec, spec.level if codec == spec.compressor else 1),
                               attributes={"scale": spec.depth_scale})
        group.create_array("skipped", shape=(n,), dtype="uint8", fill_value=0, chunks=(cs,))
        group.create_array("skip_reason", shape=(n,), dtype=str, chunks=(cs,))
        group.create_array("done", shape=(n,), dtype="uint8", fill_value=0, chunks=(cs,))
        for name in INDEX_FIELDS:
            values = np.asarray(index[name])
            arr = group.create_array(f"index/{name}", shape=values.shape,
                                     dtype=str if values.dtype.kind in "UOT" else values.dtype,
                                     chunks=(max(n, 1),) + values.shape[1:], config=_WRITE_ALL)
            if n:
                arr[...] = values
        group.attrs.update({**spec.attrs, "n": n, "layers": list(spec.layers), "chunk_size": cs,
                            "dtype": spec.dtype, "grid": g, "width": c, "complete": False, "flipped": spec.flipped})
        return cls(group, url)

    @classmethod
    def open(cls, url: str, mode: str = "r") -> "FeatureStore":
        try:
            group = zarr.open_group(url, mode=mode)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
            raise StoreError(f"no feature store at {url}") from err
        except Exception as err:  # its zarr.json truncated or overwritten: nothing to repair from
            raise StoreError(f"{url} is damaged: its metadata does not load ({type(err).__name__}: {err}); delete "
                             "it and extract again") from None
        if "n" not in group.attrs:
            raise StoreError(f"{url} is a Zarr group but not a feature store (no 'n' attribute)")
        return cls(group, url)

    def spec(self) -> StoreSpec:
        """The shapes this store was created with (`estimate_bytes` of its pending chunks)."""
        raw = _raw_layout(self.array(layer_key(self.layers[0]))) is not None
        return StoreSpec(n=self.n, layers=self.layers, grid=int(self.attrs["grid"]), width=int(self.attrs["width"]),
                         dtype=self.dtype, chunk_size=self.chunk_size, compressor="none" if raw else "zstd",
                         target_hw=self.target_hw, flipped=self.has_flipped)


class _Claims:
    """Who writes which chunk: a lock file per chunk beside the store (`pipeline.claims`)."""

    @property
    def claims_dir(self) -> Path | None:
        """The chunk claims' folder, beside the store (outside its Zarr hierarchy); None off a local disk."""
        folder = local_path(self.url)
        return None if folder is None else folder.with_name(f".{folder.name}.claims")

    @contextlib.contextmanager
    def claim_chunk(self, c: int):
        """Claim chunk `c` for writing: yields a `Claim` whose `acquired` says whether this caller may write it (a
        live holder elsewhere keeps it; off a local disk always acquired). Zarr writes a chunk to `<key>.<hex>.partial`
        and renames it: what a writer killed between the two left is removed once the claim is held."""
        self.chunk_range(c)
        if self.claims_dir is None:
            yield claims.Claim(Path(self.url), True, {})
            return
        with claims.claimed(self.claims_dir / str(c), f"extracting chunk {c} of {Path(self.url).name}") as claim:
            for name in self.data_arrays() + ["done"] if claim.acquired else []:
                path = self.chunk_path(name, c)
                for partial in path.parent.glob(f"{path.name}.*.partial") if path.parent.is_dir() else []:
                    partial.unlink(missing_ok=True)
            yield claim

    def release_claims(self) -> None:
        """Remove the claim files nobody holds, and their folder once empty (after the store is finished)."""
        if self.claims_dir is not None:
            claims.sweep(self.claims_dir)

    def chunk_path(self, name: str, c: int) -> Path | None:
        """The file that holds chunk `c` of array `name` (None: not on a local disk)."""
        folder = local_path(self.url)
        return None if folder is None else folder / self.array(name).path / _chunk_key(self.array(name), c)


class _Writes:
    """Chunks (data first, then their `done` flags), the completion mark and the records beside the index."""

    def write_chunk(self, c: int, tokens: dict[int, torch.Tensor], cls: torch.Tensor, depth: np.ndarray | None = None,
                    skipped: np.ndarray | None = None, reasons: list[str] | None = None,
                    flipped: tuple[dict[int, torch.Tensor], torch.Tensor] | None = None) -> None:
        """Write one whole chunk: its data first, then its `done` flags, so a kill mid-write leaves it pending.
        `depth` in metres; `flipped`: (tokens, cls) of the mirrored images (stores created with `flipped=True`)."""
        a, b = self.chunk_range(c)
        if bad := [k for k in self.layers if tokens[k].shape[0] != b - a]:
            raise StoreError(f"chunk {c}: layer {bad[0]} has {tokens[bad[0]].shape[0]} rows, expected {b - a}")
        if self.has_depth and depth is None:
            raise StoreError(f"chunk {c}: {self.url} stores training targets but none were given")
        if self.has_flipped != (flipped is not None):
            raise StoreError(f"chunk {c}: {self.url} stores {'' if self.has_flipped else 'no '}mirrored-image features")
        features = {layer_key(k): tokens[k] for k in self.layers} | {"cls": cls}
        if flipped is not None:
            features |= {flipped_key(layer_key(k)): flipped[0][k] for k in self.layers}
            features[flipped_key("cls")] = flipped[1]
        writes = {name: lambda t=t: self._encode(t) for name, t in features.items()}
        if self.has_depth:
            writes["depth"] = lambda: encode_depth(depth, self.depth_scale)
        writes["skipped"] = lambda: np.zeros(b - a, np.uint8) if skipped is None else skipped.astype(np.uint8)
        writes["skip_reason"] = lambda: np.array(reasons if reasons is not None else [""] * (b - a), dtype=str)

        def put(name: str) -> None:
            values = writes[name]()
            if name not in features or not self._put_raw(name, c, values):
                self.array(name)[a:b] = values

        try:
            # independent files, converted, compressed and written concurrently (numpy, torch, the codecs, I/O)
            with ThreadPoolExecutor(max_workers=min(len(writes), usable_cores())) as pool:
                for future in [pool.submit(put, name) for name in writes]:
                    future.result()
            self.array("done")[a:b] = np.ones(b - a, np.uint8)
        except Exception as err:
            # every chunk file is written to a temporary name and renamed: a full disk leaves the chunk pending
            if full := disk_full_error(err, self.url, f"writing chunk {c}"):
                raise full from None
            raise

    def _put_raw(self, name: str, c: int, values: np.ndarray) -> bool:
        """Chunk `c` written as Zarr writes it (the values, fill past the array's end, their CRC-32C; to a temporary
        name, then renamed), but with O_DIRECT from a page-aligned buffer: kept because extraction's data path ran at
        0.78-0.85x of the base through Zarr, 0.89-0.96x so (docs/design.md). False (Zarr writes it) for another
        layout, off a local disk, or where O_DIRECT is refused."""
        arr, path = self.array(name), self.chunk_path(name, c)
        if path is None or (size := _raw_layout(arr)) is None or not hasattr(os, "O_DIRECT"):
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
        try:  # before the buffer is filled: where O_DIRECT is refused, Zarr does that work
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
        except OSError as err:
            if err.errno == errno.EINVAL:  # a file system without O_DIRECT: Linux has created the file already
                tmp.unlink(missing_ok=True)
                return False
            raise
        try:
            padded = -(-size // _PAGE) * _PAGE
            block = np.empty(padded + _PAGE, np.uint8)  # from freed memory in extraction (`reuse_freed_memory`)
            data = (buf := block[-block.ctypes.data % _PAGE:][:padded])[:size]  # page-aligned
            chunk = data[:-4].view(np.dtype(arr.dtype)).reshape(arr.chunks)
            chunk[:len(values)], chunk[len(values):] = values, arr.metadata.fill_value
            data[-4:] = np.frombuffer(np.uint32(crc32c.crc32c(data[:-4])).astype("<u4").tobytes(), np.uint8)
            if os.write(fd, memoryview(buf)[:padded]) != padded:  # short: the disk filled meanwhile
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
            os.ftruncate(fd, size)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return True

    def _encode(self, t: torch.Tensor) -> np.ndarray:
        t = t.detach().cpu()
        if self.dtype == "bfloat16":
            return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return t.to(torch.float16).numpy()

    def reset_chunks(self, chunks: Iterable[int]) -> None:
        """Mark chunks not done before they are written again (a kill then leaves them pending), and the store
        not complete."""
        chunks = list(chunks)
        if chunks and self.complete:
            self._set_attr("complete", False)
        for c in chunks:
            a, b = self.chunk_range(c)
            self.array("done")[a:b] = np.zeros(b - a, np.uint8)

    def mark_complete(self) -> None:
        if pending := self.pending_chunks():
            raise StoreError(f"{self.url}: chunks {pending[:10]} are not done; cannot mark complete")
        try:
            self._set_attr("complete", True)
        except Exception as err:
            if full := disk_full_error(err, self.url, "marking the store complete"):
                raise full from None
            raise

    def mark_verified(self, chunks: Iterable[int]) -> None:
        """Chunks this process found sound (`prepare_store`): `finalize_store` need not decode them again."""
        self.verified = frozenset(chunks)

    def record_data_roots(self, roots: dict) -> None:
        self._set_attr("data_roots", roots)

    def _set_attr(self, key: str, value) -> None:
        self.group.attrs[key] = value
        self.attrs[key] = value

    def record_sources(self, signatures: dict[str, np.ndarray]) -> None:
        """Record (or replace) the files' signatures (`sources`), beside the index, outside the fingerprint."""
        for k in SOURCES:
            values = np.asarray(signatures[k], np.int64).reshape(self.n, 2)
            arr = self.group.create_array(f"sources/{k}", shape=values.shape, dtype="int64",
                                          chunks=(max(self.n, 1), 2), overwrite=True, config=_WRITE_ALL)
            if self.n:
                arr[...] = values

    def rewrite_index(self, index: dict[str, np.ndarray], names: Iterable[str]) -> None:
        """Write the index columns `names` again from a fresh plan of the same split (repair of a damaged column)."""
        for name in names:
            values = np.asarray(index[name])
            if len(values) != self.n:
                raise StoreError(f"cannot repair index/{name} of {self.url}: the split now plans {len(values)} "
                                 f"samples, the store holds {self.n}; delete the store and extract it again")
            self.array(f"index/{name}")[...] = values


class _Reads:
    """Batches of samples, the done flags, the index and the source records."""

    def array(self, name: str) -> zarr.Array:
        """The store's array `name`, opened once (its metadata does not change), writing every chunk."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name].with_config(_WRITE_ALL)
        return self._arrays[name]

    def chunk_range(self, c: int) -> tuple[int, int]:
        if not 0 <= c < self.n_chunks:
            raise StoreError(f"chunk {c} out of range 0..{self.n_chunks - 1} in {self.url}")
        return c * self.chunk_size, min((c + 1) * self.chunk_size, self.n)

    @property
    def complete(self) -> bool:
        return bool(self.group.attrs.get("complete", False))

    def done_flags(self) -> np.ndarray:
        """1 per finished sample; a chunk of flags that does not decode reads as not done (extracted again)."""
        return self._tolerant("done", 0)[0]

    def chunk_done(self, c: int) -> bool:
        try:
            return bool(self.array("done")[slice(*self.chunk_range(c))].all())
        except Exception:  # a damaged flag file: not finished
            return False

    def pending_chunks(self) -> list[int]:
        done = self.done_flags()
        return [c for c in range(self.n_chunks) if not done[slice(*self.chunk_range(c))].all()]

    def _tolerant(self, name: str, fill) -> tuple[np.ndarray, dict[int, str]]:
        """A per-sample array written chunk by chunk, whole; a chunk that does not decode reads as `fill`.
        Returns (values, {chunk: why it does not decode})."""
        arr, dtype = self.array(name), self.array(name).dtype if fill == 0 else object
        try:
            return (arr[:] if self.n else np.zeros(0, dtype)), {}
        except Exception:
            parts, bad = [], {}
            for c in range(self.n_chunks):
                a, b = self.chunk_range(c)
                try:
                    parts.append(arr[a:b])
                except Exception as err:
                    bad[c] = f"{type(err).__name__}: {err}"
                    parts.append(np.full(b - a, fill, dtype=dtype))
            return np.concatenate(parts), bad

    def read(self, sel: slice | np.ndarray | Iterable[int], layers: Iterable[int] | None = None,
             depth: bool = True, flipped: bool = False, *, _chunk: int | None = None) -> dict:
        """A batch: {"tokens": {k: (B, g, g, C)}, "global": (B, C)} (stored dtype), "depth" (B, H, W) float32
        metres (0 = invalid) where the store has targets, "index" (B,) positions; `flipped`: "flipped_tokens" and
        "flipped_global" too. `sel`: a slice or sorted positions. A chunk that does not decode: `StoreError`."""
        layers = self.layers if layers is None else tuple(layers)
        if unknown := sorted(set(layers) - set(self.layers)):
            raise StoreError(f"layers {unknown} are not in {self.url} (it holds {list(self.layers)})")
        if flipped and not self.has_flipped:
            raise StoreError(f"{self.url} holds no mirrored-image features (extracted with views.flip=features)")
        if not isinstance(sel, slice):
            sel = np.asarray(sel if isinstance(sel, np.ndarray) else list(sel), dtype=np.int64)
        names = {("tokens", k): layer_key(k) for k in layers} | {("global", None): "cls"}  # (key, layer) -> array
        if flipped:
            names |= {("flipped_" + key, k): flipped_key(name) for (key, k), name in names.items()}
        if depth and self.has_depth:
            names[("depth", None)] = "depth"
        batch = {"index": np.arange(self.n)[sel]}
        for (key, k), values in zip(names, self._select(list(names.values()), sel, _chunk)):
            if key == "depth":
                values = torch.from_numpy(decode_depth(values, self.depth_scale))
            else:  # bfloat16, which numpy lacks, stored as its bits
                values = torch.from_numpy(values.view(np.int16)).view(torch.bfloat16) if self.dtype == "bfloat16" \
                    else torch.from_numpy(values)
            if k is None:
                batch[key] = values
            else:
                batch.setdefault(key, {})[k] = values
        return batch

    def read_chunk(self, c: int, layers: Iterable[int] | None = None, depth: bool = True,
                   flipped: bool = False) -> dict:
        """`read` of one whole chunk: the streaming loader's read, uncompressed arrays by `_raw_chunk`."""
        return self.read(slice(*self.chunk_range(c)), layers, depth, flipped, _chunk=c)

    def _select(self, names: list[str], sel, c: int | None) -> list[np.ndarray]:
        """`sel` of each array in `names`: whole chunk `c` of an uncompressed array by `_raw_chunk`, the rest
        concurrently in Zarr's event loop (one round trip for all), each chunk's CRC-32C checked as it is read."""
        direct = {name: self._raw_chunk(name, c) for name in names} if c is not None else {}
        rest = [name for name in names if direct.get(name) is None]
        arrays = [self.array(name).async_array for name in rest]  # opened here: no sync() inside the loop

        async def every():
            return await asyncio.gather(*(arr.getitem(sel) if isinstance(sel, slice) else
                                          arr.get_orthogonal_selection((sel,)) for arr in arrays),
                                        return_exceptions=True)

        read = dict(zip(rest, sync(every()) if rest else []))
        for name, values in read.items():
            if isinstance(values, BaseException):
                first = (sel.start or 0) if isinstance(sel, slice) else (int(sel[0]) if len(sel) else 0)
                raise self._damaged(name, first // self.chunk_size, values)
        return [np.ascontiguousarray(read[name]) if direct.get(name) is None else direct[name] for name in names]

    def _raw_chunk(self, name: str, c: int) -> np.ndarray | None:
        """Chunk `c` of an uncompressed array read straight from its file into the array returned, its CRC-32C
        checked: the bytes Zarr reads, in one buffer instead of two. Kept: it doubles the streaming loader's
        per-thread read rate where fresh memory is dear (docs/design.md). None (Zarr reads it) for another layout."""
        arr, path = self.array(name), self.chunk_path(name, c)
        if path is None or (size := _raw_layout(arr)) is None:
            return None
        (a, b), dtype, buf = self.chunk_range(c), np.dtype(arr.dtype), np.empty(size, np.uint8)
        try:
            with open(path, "rb", buffering=0) as f:
                found, got = os.fstat(f.fileno()).st_size, f.readinto(memoryview(buf))
        except FileNotFoundError:  # never written: Zarr's fill value
            return np.full((b - a, *arr.shape[1:]), arr.metadata.fill_value, dtype)
        if found != size or got != size:
            raise self._damaged(name, c, ValueError(f"{found} bytes where the chunk has {size}"))
        if crc32c.crc32c(buf[:-4]) != int(np.frombuffer(buf[-4:], "<u4")[0]):
            raise self._damaged(name, c, ValueError("its CRC-32C does not match: the file was changed or cut"))
        return buf[:-4].view(dtype).reshape(arr.chunks)[:b - a]

    def _damaged(self, name: str, c: int, err: BaseException) -> StoreError:
        return StoreError(f"{self.chunk_path(name, c) or self.url}: chunk {c} of {name} does not decode "
                          f"({type(err).__name__}: {err}); `spaceclip cache verify` lists the damage, and the same "
                          "extraction run again with --verify-cache (cache.verify=full) repairs it")

    def index(self, skips: bool = True):
        """The per-sample index as a DataFrame; `skips=False` without `skipped` and `skip_reason` (a file a chunk)."""
        import pandas as pd

        cols = {}
        for name in INDEX_FIELDS:
            if name == "view_aug" and f"index/{name}" not in self.group:  # written before augmentation existed
                values = np.tile(np.asarray(IDENTITY_AUG), (self.n, 1))
            elif self.n:
                values = self.array(f"index/{name}")[:]
            else:
                values = np.zeros((0, len(_INDEX_COLUMNS[name])) if name in _INDEX_COLUMNS else 0)
            cols.update(dict(zip(_INDEX_COLUMNS[name], values.T)) if name in _INDEX_COLUMNS else {name: values})
        df = pd.DataFrame(cols)
        if skips:  # a damaged chunk of the skip records reads as "not skipped" (it is extracted again: `verify`)
            df["skipped"] = self._tolerant("skipped", 0)[0].astype(bool)
            df["skip_reason"] = self._tolerant("skip_reason", "")[0]
        return df

    def usable(self) -> np.ndarray:
        """(N,) bool: the samples that were read (not `skipped`)."""
        return ~self.array("skipped")[:].astype(bool) if self.n else np.zeros(0, bool)

    def sources(self) -> dict[str, np.ndarray] | None:
        """{"image", "depth"}: (N, 2) int64 (size, mtime in ns) of each sample's files when it was extracted; None
        where not recorded (older stores) or damaged: it is then recorded again."""
        try:
            return {k: self.group[f"sources/{k}"][:] for k in SOURCES} if "sources" in self.group else None
        except Exception:
            return None


class _Verification:
    """Whether every done chunk is there and decodes (`verify`)."""

    def data_arrays(self) -> list[str]:
        features = [layer_key(k) for k in self.layers] + ["cls"]
        return features + ["skipped", "skip_reason"] + [flipped_key(name) for name in features if self.has_flipped] \
            + (["depth"] if self.has_depth else [])

    def verify(self, chunks: Iterable[int] | None = None, quick: bool = False) -> dict:
        """Check that every done chunk of every data array (and of `done`) exists and decodes (CRC-32C included),
        that the index arrays decode and the counts match; `chunks`: decode only these done chunks. `quick`
        (extraction reusing a store): uncompressed feature files checked by their size (a changed byte is left to
        the CRC every read checks), the other arrays decoded, and chunks whose claim a writer left behind too.
        `damaged_chunks`: what extraction writes again; `damaged_index`: the index columns it rewrites."""
        done, bad_flags = self._tolerant("done", 0)
        done_chunks = [c for c in range(self.n_chunks) if done[slice(*self.chunk_range(c))].all()]
        claimed = {int(p.name) for p in self.claims_dir.iterdir() if p.name.isdigit()} \
            if quick and self.claims_dir is not None and self.claims_dir.is_dir() else set()
        decode = claimed if quick else set(done_chunks if chunks is None else chunks)
        try:
            ids = self.group["index/id"][:]
        except Exception:
            ids = None

        def where(c: int) -> str:
            a, b = self.chunk_range(c)
            return f"samples ({a}, {b})" + (f": {ids[a]} .. {ids[b - 1]}" if ids is not None and b > a else "")

        problems = [f"done: chunk {c} does not decode ({where(c)}): {why}" for c, why in sorted(bad_flags.items())]
        damaged = set(bad_flags)
        for name in self.data_arrays() + ["done"]:
            try:
                arr = self.array(name)
            except Exception as err:  # its zarr.json is gone or damaged: extraction cannot repair that
                problems.append(f"{name}: the array's metadata does not load ({type(err).__name__}: {err}); delete "
                                f"the store and extract it again")
                continue
            for c in done_chunks:
                problem = self._chunk_problem(arr, name, c, c in decode, quick, where(c))
                if problem:
                    problems.append(problem)
                    damaged.add(c)
        n_done = int(done.sum())
        skipped, bad_skips = self._tolerant("skipped", 0)
        if self.complete and n_done != self.n:
            problems.append(f"store is marked complete but only {n_done} of {self.n} samples are done")
        damaged_index = self._check_index(problems)
        return {
            "url": self.url, "n": self.n, "done": n_done, "skipped": -1 if bad_skips else int(skipped.sum()),
            "chunks": self.n_chunks, "done_chunks": len(done_chunks), "complete": self.complete,
            "fingerprint": self.fingerprint, "problems": problems, "ok": not problems and n_done == self.n,
            "damaged_chunks": sorted(damaged), "damaged_index": damaged_index,
        }

    def _chunk_problem(self, arr: zarr.Array, name: str, c: int, decode: bool, quick: bool, where: str) -> str | None:
        """What is wrong with chunk `c` of `arr`, or None. Its file's existence first (Zarr reads a missing one as
        the fill value); `quick`, not `decode`: a feature file by its size (compressed: more than its CRC)."""
        key, path = f"{arr.path}/{_chunk_key(arr, c)}", self.chunk_path(name, c)
        if path is not None:
            found = path.stat().st_size if path.is_file() else None
        else:
            found = 0 if sync(self.group.store.exists(key)) else None
        if found is None:
            return f"{name}: chunk {c} (samples {self.chunk_range(c)}) is missing ({key})"
        size = _raw_layout(arr)
        features = name.startswith("tokens/") or "/tokens/" in name or name.endswith("cls")
        if quick and not decode and path is not None and (size is not None or features):
            if found == size or (size is None and found > 4):
                return None
            return f"{name}: chunk {c} ({where}; file {key}) has {found} bytes where the chunk has {size or 'more'}"
        if not decode and not quick:
            return None
        try:
            arr[slice(*self.chunk_range(c))]
        except Exception as err:  # a truncated or corrupt chunk file
            return f"{name}: chunk {c} does not decode ({where}; file {key}): {type(err).__name__}: {err}"
        return None

    def _check_index(self, problems: list[str]) -> list[str]:
        """The index columns that do not decode (the others' problems appended to `problems`)."""
        damaged = []
        for name in INDEX_FIELDS:
            key = f"index/{name}"
            try:
                if key not in self.group:
                    if name != "view_aug":  # the one field older stores may lack
                        problems.append(f"{key} is missing")
                elif (arr := self.array(key)).shape[0] != self.n:
                    problems.append(f"{key} has {arr.shape[0]} rows, expected {self.n}")
                elif self.n:
                    arr[:]
            except Exception as err:
                problems.append(f"{key}: does not decode (samples (0, {self.n}): the whole index column): "
                                f"{type(err).__name__}: {err}")
                damaged.append(name)
        return damaged


class FeatureStore(_Creation, _Claims, _Writes, _Reads, _Verification):
    """One feature store (see the module's text); `FeatureStore.create(url, spec, index)` or `.open(url)`."""

    def __init__(self, group: zarr.Group, url: str):
        self.group, self.url, self.attrs = group, url, dict(group.attrs)
        self.n, self.chunk_size = int(self.attrs["n"]), int(self.attrs["chunk_size"])
        self.n_chunks = -(-self.n // self.chunk_size)
        self.layers: tuple[int, ...] = tuple(self.attrs["layers"])
        self.dtype: str = self.attrs["dtype"]  # float16 or bfloat16
        self.fingerprint: str | None = self.attrs.get("fingerprint")
        self.has_depth: bool = "depth" in group
        self.has_flipped: bool = bool(self.attrs.get("flipped", False))
        self.verified: frozenset[int] = frozenset()  # `mark_verified`
        self._arrays: dict[str, zarr.Array] = {}  # opened once: each `group[name]` reads the array's zarr.json
        self.target_hw = tuple(self.array("depth").shape[1:]) if self.has_depth else None  # (H, W) of the targets
        self.depth_scale = float(self.array("depth").attrs["scale"]) if self.has_depth else None  # values a metre
