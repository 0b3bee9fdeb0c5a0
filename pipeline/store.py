"""The Zarr v3 feature store: one store per (dataset, split, fingerprint).

Layout (N samples, g x g token grid, C channels):

    tokens/L{k}   (N, g, g, C)  float16, or bfloat16 kept as its uint16 bits (attr `bfloat16_bits`)
    cls           (N, C)        pooled global vector (the encoder's pooler_output), same dtype
    depth         (N, H, W)     uint16 training target, metres x attr `scale`, 0 = invalid (training splits only)
    skipped       (N,)          uint8, 1 where the sample could not be read (`on_error: skip`)
    skip_reason   (N,)          str
    done          (N,)          uint8, written *after* the chunk's data: a chunk is finished iff all its flags are 1
    index/*       per-sample id, paths, focal, original size, view (k, top, left, h, w), group, line, and
                  view_aug (angle, gamma, brightness, gain R, G, B): every view's parameters, enough to recompute it

Every data array is chunked along N only, with the same chunk length, so one writer owns whole chunks (zarr does
no locking: two writers touching one chunk corrupt it). A chunk is also the unit of work of extraction, and the
unit of ownership: a writer claims a chunk first (`claim_chunk`, a lock file in `.<name>.claims/` beside the store,
outside the Zarr hierarchy; `pipeline/claims.py`), so concurrent runs of one config share the chunks between them.
A store is created in a hidden sibling folder and renamed into place, so two creators of one store never see or
overwrite half of the other's.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import json
import mmap
import os
import shutil
import socket
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import crc32c
import numcodecs
import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, BytesCodec, Crc32cCodec, ZstdCodec
from zarr.codecs.bytes import Endian
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.sync import sync

from pipeline import claims
from pipeline.errors import DiskFullError, SpaceClipError, is_disk_full

INDEX_FIELDS = ("id", "image_path", "depth_path", "focal", "orig_hw", "view", "group", "line", "view_aug")
# view_aug (N, 6) float64: each view's augmentation (rotation angle in degrees, gamma, brightness, gain R, G, B),
# the identity (0, 1, 1, 1, 1, 1) for a view without any. Stores written before it existed read as the identity.
VIEW_AUG_COLUMNS = ("view_angle", "view_gamma", "view_brightness", "view_gain_r", "view_gain_g", "view_gain_b")
IDENTITY_AUG = (0.0, 1.0, 1.0, 1.0, 1.0, 1.0)


class StoreError(SpaceClipError, RuntimeError):
    """A feature store is missing, incomplete or does not match what the caller expects."""


def flipped_key(name: str) -> str:
    """Where the mirrored image's copy of a data array lives (`tokens/L3` -> `flipped/tokens/L3`)."""
    return f"flipped/{name}"


def layer_key(k: int) -> str:
    return f"tokens/L{k}"


def depth_metres(stored: np.ndarray, scale: float, out: np.ndarray | None = None) -> np.ndarray:
    """Stored depth (uint16, or its int16 bits) as float32 metres in one pass: `stored.astype(float32) / scale`,
    bit for bit."""
    return np.divide(stored.view(np.uint16), np.float32(scale), dtype=np.float32, out=out)


def byte_view(t: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor (any dtype, bfloat16 included) as a writable uint8 numpy view: copies
    between such views are numpy's, in one thread with the GIL released, where torch would split a large copy over
    its OpenMP threads (BENCHMARKS.md, issue 14)."""
    return t.view(torch.uint8).numpy()


def local_path(url: str) -> Path | None:
    """The folder of a store on the local file system, or None for another fsspec URL (s3://, gs://, ...)."""
    if url.startswith("file://"):
        return Path(url.removeprefix("file://"))
    return None if "://" in url else Path(url)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def disk_full_error(err: BaseException, url: str, doing: str) -> DiskFullError | None:
    """A one-line `DiskFullError` for a write of `doing` into the store at `url` that failed with ENOSPC, else None."""
    if not is_disk_full(err, local_path(url)):
        return None
    return DiskFullError(
        f"disk full while {doing} in {url} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}): "
        "nothing half-written is kept; free space on that file system (or set cache.root to a larger one) and run "
        "the same command again: finished chunks are kept and only the missing ones are extracted")


def _compressors(name: str, level: int) -> list:
    """The bytes-to-bytes codecs of a data array: the compressor, then a CRC-32C of the chunk (4 bytes, checked on
    every read), so that a changed byte is found by `verify` and by every reader, not only a truncation."""
    if name == "none":
        return [Crc32cCodec()]
    if name == "zstd":
        return [ZstdCodec(level=level), Crc32cCodec()]
    if name == "blosc-zstd":  # byte shuffle groups the fp16 exponent bytes together
        return [BloscCodec(cname="zstd", clevel=level, shuffle=BloscShuffle.shuffle, typesize=2), Crc32cCodec()]
    raise StoreError(f"unknown compressor {name!r}; choose none, zstd or blosc-zstd")


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
        for _k in FeatureStore.SOURCES:  # (N, 2) int64 each, `record_sources`
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


DIRECT_WRITE_BYTES = 1 << 20  # files at least this large are written with O_DIRECT where the filesystem allows
_ALIGN = 4096
_direct_buffers = threading.local()


def write_file(path: Path, data: np.ndarray, tail: bytes = b"") -> None:
    """A new file holding `data` (uint8) then `tail`. From `DIRECT_WRITE_BYTES` on, its 4 KiB-aligned bulk goes
    through O_DIRECT, from `data` itself where it is page-aligned (extraction's `ChunkBuffers`), else from an
    aligned buffer each thread keeps: the disk takes it from that buffer, and the page cache is never filled, which
    on this VM costs the kernel 1.5-5 ms of CPU per MB of fresh pages (BENCHMARKS.md, issue 14), against ~0.25
    for the copy into the aligned buffer and the direct write. The rest (under 4 KiB, and
    `tail`) is written normally. A filesystem that refuses O_DIRECT (EINVAL: older tmpfs) and smaller files take
    the plain write; both give the same bytes."""
    size = data.nbytes
    bulk = size - size % _ALIGN
    fd = None
    if bulk >= DIRECT_WRITE_BYTES and hasattr(os, "O_DIRECT"):
        with contextlib.suppress(OSError):  # EINVAL: no O_DIRECT here
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    if fd is None:
        with path.open("wb") as f:
            f.write(memoryview(data))
            f.write(tail)
        return
    try:
        if data.ctypes.data % _ALIGN == 0:  # page-aligned already (extraction's chunk buffers): no staging copy
            done = os.write(fd, memoryview(data)[:bulk])
        else:
            buf = getattr(_direct_buffers, "buf", None)
            if buf is None or len(buf) < bulk:
                buf = _direct_buffers.buf = mmap.mmap(-1, bulk)  # page-aligned
            staged = np.frombuffer(buf, np.uint8, count=bulk)
            np.copyto(staged, data[:bulk])
            done = os.write(fd, memoryview(buf)[:bulk])
        # the rest, and whatever a short direct write left (a nearly full disk), through the page cache: a full
        # disk then fails there with ENOSPC, as a plain write does
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        with open(fd, "wb", closefd=False) as f:
            f.write(memoryview(data)[done:])
            f.write(tail)
    finally:
        os.close(fd)


class _ChunkFiles:
    """Whole chunks of one array read straight from their files and decoded by numcodecs (the library Zarr's own
    zstd and blosc codecs call): the values `arr[a:b]` gives, a missing chunk file reading as the fill value as
    in Zarr, without Zarr's event-loop round trips. Those cost as much as the decompression itself and serialise
    readers in several threads (BENCHMARKS.md, issue 14). Only for the layouts this module writes on a local disk:
    a numeric array chunked along its first axis alone, little-endian bytes, then nothing, zstd or blosc, then
    optionally a CRC-32C; `of` returns None for anything else (Zarr reads it)."""

    def __init__(self, folder: Path, arr: zarr.Array, decoder, checksum: bool, encoder=False):
        m = arr.metadata
        self.folder, self.name, self.decoder, self.checksum = folder, arr.path, decoder, checksum
        # `encoder`: the numcodecs codec Zarr itself builds from the array's metadata (None: raw bytes); False:
        # no direct writes (blosc: Zarr writes those chunks).
        self.encoder = encoder
        self.encode_key = m.chunk_key_encoding.encode_chunk_key
        self.chunk_shape = tuple(m.chunk_grid.chunk_shape)
        self.dtype = np.dtype(m.data_type.to_native_dtype())
        self.fill = m.fill_value

    @classmethod
    def of(cls, arr: zarr.Array, url: str) -> "_ChunkFiles | None":
        folder = local_path(url)
        m = arr.metadata
        if folder is None or getattr(m, "zarr_format", None) != 3 or not isinstance(m.chunk_grid, RegularChunkGrid):
            return None
        if tuple(m.chunk_grid.chunk_shape[1:]) != tuple(arr.shape[1:]):
            return None
        dtype = np.dtype(m.data_type.to_native_dtype())
        if dtype.kind not in "fiub" or dtype.byteorder == ">":
            return None
        codecs = tuple(m.codecs)
        if not codecs or not isinstance(codecs[0], BytesCodec) or codecs[0].endian not in (None, Endian.little):
            return None
        checksum = isinstance(codecs[-1], Crc32cCodec)
        middle = codecs[1:-1] if checksum else codecs[1:]
        if not middle:
            return cls(folder, arr, None, checksum, encoder=None)
        if len(middle) == 1 and isinstance(middle[0], ZstdCodec):
            zstd = middle[0]
            return cls(folder, arr, numcodecs.Zstd(), checksum,
                       encoder=numcodecs.Zstd.from_config({"level": zstd.level, "checksum": zstd.checksum}))
        if len(middle) == 1 and isinstance(middle[0], BloscCodec):
            return cls(folder, arr, numcodecs.Blosc(), checksum)
        return None

    def path(self, c: int) -> Path:
        return self.folder / self.name / self.encode_key((c,) + (0,) * (len(self.chunk_shape) - 1))

    def write(self, c: int, values: np.ndarray) -> bool:
        """Chunk `c` from its rows (fewer in the last chunk, padded with the fill value as Zarr pads an edge chunk),
        encoded as Zarr encodes it, written to a temporary name and renamed over the chunk (Zarr's own way). The
        same bytes as `arr[a:b] = values`. Returns False, writing nothing, where Zarr must write it (blosc)."""
        if self.encoder is False:
            return False
        values = np.asarray(values, dtype=self.dtype)
        if values.shape[1:] != self.chunk_shape[1:] or len(values) > self.chunk_shape[0]:
            raise StoreError(f"chunk {c} of {self.name}: rows of shape {values.shape}, chunk {self.chunk_shape}")
        if len(values) < self.chunk_shape[0]:
            full = np.full(self.chunk_shape, self.fill, self.dtype)
            full[:len(values)] = values
            values = full
        data = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
        if self.encoder is not None:
            data = np.frombuffer(self.encoder.encode(data), np.uint8)
        path = self.path(c)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{uuid.uuid4().hex}.partial")
        tail = np.uint32(crc32c.crc32c(data)).tobytes() if self.checksum else b""
        try:
            write_file(tmp, data, tail)
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return True

    def read(self, c: int, rows: int) -> np.ndarray:
        """The first `rows` rows of chunk `c` (fewer than the chunk length in the last chunk). An uncompressed chunk
        is read straight into the array it is returned in (one copy out of the page cache)."""
        path = self.path(c)
        try:
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                buf = np.empty(size, np.uint8)
                got = f.readinto(memoryview(buf))
        except FileNotFoundError:  # never written: Zarr's fill value
            return np.full((rows, *self.chunk_shape[1:]), self.fill, self.dtype)
        try:
            if got != size:
                raise ValueError(f"read {got} of its {size} bytes")
            data = buf
            if self.checksum:
                data = buf[:-4]
                if np.uint32(crc32c.crc32c(data)).tobytes() != buf[-4:].tobytes():
                    raise ValueError("its CRC-32C does not match: the file was changed or cut")
            nbytes = int(np.prod(self.chunk_shape)) * self.dtype.itemsize
            if self.decoder is None:
                if data.size != nbytes:
                    raise ValueError(f"{data.size} bytes of data where the chunk has {nbytes}")
                out = data.view(self.dtype).reshape(self.chunk_shape)
            else:
                out = np.empty(self.chunk_shape, self.dtype)
                self.decoder.decode(data, out=out)
        except Exception as err:
            raise self.damaged(c, f"{type(err).__name__}: {err}") from None
        return out[:rows]

    def damaged(self, c: int, why: str) -> StoreError:
        return StoreError(f"{self.path(c)}: chunk {c} of {self.name} does not decode ({why}); "
                          "`spaceclip cache verify` lists the damage, and the same extraction run again with "
                          "--verify-cache (cache.verify=full) repairs it")


# ---- CRC-32C of a chunk from the CRCs of its rows -------------------------------------------------------------
# A chunk's stored CRC covers its rows in order, but the streaming loader reads the rows one at a time, in shuffled
# order, straight into batches. CRCs are linear, so crc(A || B) = Z_len(B)(crc(A)) ^ crc(B), where Z_n is the
# (32 x 32, over GF(2)) operator that appends n zero bytes: zlib's crc32_combine, here for the Castagnoli
# polynomial. All rows of an array have one length, so Z is built once per length and a combine is 32 xors.
_CASTAGNOLI_REFLECTED = 0x82F63B78


def _gf2_times(mat: tuple[int, ...], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _gf2_product(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_gf2_times(a, col) for col in b)  # a . b: the columns of b mapped by a


@functools.lru_cache(maxsize=64)
def _zeros_operator(nbytes: int) -> tuple[int, ...]:
    """Z_nbytes: the CRC-32C state after appending `nbytes` zero bytes, as a linear map of the state before."""
    bit = (_CASTAGNOLI_REFLECTED,) + tuple(1 << i for i in range(31))  # one zero bit (reflected CRC)
    byte = bit
    for _ in range(3):  # 2 -> 4 -> 8 bits
        byte = _gf2_product(byte, byte)
    result = tuple(1 << i for i in range(32))  # identity
    while nbytes:  # square-and-multiply over the bits of nbytes
        if nbytes & 1:
            result = _gf2_product(byte, result)
        nbytes >>= 1
        if nbytes:
            byte = _gf2_product(byte, byte)
    return result


def crc32c_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """CRC-32C of A || B from crc(A), crc(B) and len(B) (zlib's crc32_combine, Castagnoli polynomial)."""
    return _gf2_times(_zeros_operator(len_b), crc_a) ^ crc_b


class ChunkRows:
    """One uncompressed chunk file read a row at a time straight into the caller's memory (a batch row: no
    intermediate chunk buffer, so the streaming loader copies each sample once), its CRC-32C checked once every
    row has been read (`finish`): the row CRCs are combined into the chunk's (`crc32c_combine`) and compared with
    the 4 bytes Zarr's crc32c codec stored. A missing file reads as the fill value, as in Zarr. Thread-safe: the
    loader's pool reads rows of one chunk for several batches at once."""

    def __init__(self, files: "_ChunkFiles", c: int):
        self.files, self.c, self.path = files, c, files.path(c)
        self.rows = files.chunk_shape[0]
        self.row_bytes = int(np.prod(files.chunk_shape[1:])) * files.dtype.itemsize
        self.crcs: list[int | None] = [None] * self.rows
        self._lock = threading.Lock()
        self.fd: int | None = None
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        size, tail = os.fstat(self.fd).st_size, 4 if files.checksum else 0
        if size != self.rows * self.row_bytes + tail:
            self.close()
            raise self._damaged(f"{size} bytes where the chunk has {self.rows * self.row_bytes}"
                                + (" and its CRC 4" if tail else ""))
        self.stored_crc = int(np.frombuffer(os.pread(self.fd, 4, size - 4), "<u4")[0]) if tail else None

    def read_into(self, r: int, out: np.ndarray) -> None:
        """Row `r` into `out` (C-contiguous, the row's shape and dtype), its CRC noted."""
        flat = out.reshape(-1).view(np.uint8)
        if self.fd is None:
            flat.view(self.files.dtype)[...] = self.files.fill
            return
        view = memoryview(flat)
        got = os.preadv(self.fd, [view], r * self.row_bytes)
        if got != self.row_bytes:
            raise self._damaged(f"read {got} of row {r}'s {self.row_bytes} bytes")
        crc = crc32c.crc32c(flat) if self.stored_crc is not None else 0
        with self._lock:
            self.crcs[r] = crc

    def finish(self, scratch: np.ndarray | None = None) -> None:
        """Check the chunk's CRC, reading (into `scratch`, one row's worth) the rows no batch took: padding of
        the last chunk, skipped samples, the dropped last batch. Closes the file."""
        try:
            if self.fd is None or self.stored_crc is None:  # never written, or a store from before checksums
                return
            missing = [r for r, crc in enumerate(self.crcs) if crc is None]
            if missing:
                scratch = np.empty(self.row_bytes, np.uint8) if scratch is None else scratch
                for r in missing:
                    self.read_into(r, scratch.reshape(-1).view(np.uint8)[:self.row_bytes])
            crc = self.crcs[0]
            for row_crc in self.crcs[1:]:
                crc = crc32c_combine(crc, row_crc, self.row_bytes)
            if crc != self.stored_crc:
                raise self._damaged("its CRC-32C does not match: the file was changed or cut")
        finally:
            self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _damaged(self, why: str) -> StoreError:
        return self.files.damaged(self.c, why)


class FeatureStore:
    created: bool = False  # True on the object `create` returned when this caller made the store
    verified: frozenset[int] = frozenset()  # chunks `pipeline.extract.prepare_store` found sound (decoded)

    def __init__(self, group: zarr.Group, url: str):
        self.group = group
        self.url = url
        self.attrs = dict(group.attrs)
        self.n: int = int(self.attrs["n"])
        self.layers: tuple[int, ...] = tuple(self.attrs["layers"])
        self.chunk_size: int = int(self.attrs["chunk_size"])
        self.dtype: str = self.attrs["dtype"]
        self.fingerprint: str | None = self.attrs.get("fingerprint")
        self.has_depth: bool = "depth" in group
        self.has_flipped: bool = bool(self.attrs.get("flipped", False))
        self._arrays: dict[str, zarr.Array] = {}  # opened once: each `group[name]` reads the array's zarr.json
        self._direct: dict[str, "_ChunkFiles | None"] = {}

    # ---- creation and opening ------------------------------------------------------------------------------
    @classmethod
    def create(cls, url: str, spec: StoreSpec, index: dict[str, np.ndarray]) -> "FeatureStore":
        """A new store at `url`. On the local file system it is written into a hidden sibling folder and renamed
        into place: when another process created the same store meanwhile (two runs of one config), that store is
        returned (`created` False) and this one discarded; an existing store is never overwritten."""
        folder = local_path(url)
        if folder is None:  # fsspec URLs: no atomic rename; written in place, as before
            store = cls._create(zarr.open_group(url, mode="w"), url, spec, index)
            store.created = True
            return store
        host = socket.gethostname()
        tmp = folder.with_name(f".{folder.name}.creating-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        folder.parent.mkdir(parents=True, exist_ok=True)
        for left in folder.parent.glob(f".{glob.escape(folder.name)}.creating-{glob.escape(host)}-*"):
            pid = left.name.rsplit("-", 2)[-2]  # a creator of this host killed before its rename
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(left, ignore_errors=True)
        try:
            cls._create(zarr.open_group(str(tmp), mode="w"), str(tmp), spec, index)
            os.rename(tmp, folder)  # atomic; fails when `folder` holds a store (a non-empty folder)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            full = disk_full_error(err, url, "creating the store")
            if full is not None:
                raise full from None
            if not folder.is_dir():
                raise
            try:
                store = cls.open(url, mode="r+")
            except StoreError:
                raise StoreError(f"{url} exists but is not a readable feature store; delete it and run again") from None
            if store.fingerprint != spec.attrs.get("fingerprint"):
                raise StoreError(f"{url} already holds a store with fingerprint {store.fingerprint}, not "
                                 f"{spec.attrs.get('fingerprint')}; delete it or choose another cache.root") from None
            return store  # another process created it first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        store = cls.open(url, mode="r+")
        store.created = True
        return store

    @classmethod
    def _create(cls, group: zarr.Group, url: str, spec: StoreSpec, index: dict[str, np.ndarray]) -> "FeatureStore":
        if "view_aug" not in index:  # no augmentation recorded: every view is un-augmented
            index = {**index, "view_aug": np.tile(np.asarray(IDENTITY_AUG), (spec.n, 1))}
        missing = [f for f in INDEX_FIELDS if f not in index]
        if missing:
            raise StoreError(f"index for {url} lacks fields {missing}")
        for name, values in index.items():
            if len(values) != spec.n:
                raise StoreError(f"index field {name!r} has {len(values)} rows, expected {spec.n}")
        n, g, c, cs = spec.n, spec.grid, spec.width, spec.chunk_size
        store_dtype = "uint16" if spec.dtype == "bfloat16" else spec.dtype
        common = dict(compressors=_compressors(spec.compressor, spec.level))
        # n == 0 (every sample skipped) still makes a valid, empty store.
        for k in spec.layers:
            arr = group.create_array(layer_key(k), shape=(n, g, g, c), chunks=(cs, g, g, c), dtype=store_dtype,
                                     fill_value=0, **common)
            arr.attrs["bfloat16_bits"] = spec.dtype == "bfloat16"
        group.create_array("cls", shape=(n, c), chunks=(cs, c), dtype=store_dtype, fill_value=0, **common)
        if spec.flipped:
            for k in spec.layers:
                arr = group.create_array(flipped_key(layer_key(k)), shape=(n, g, g, c), chunks=(cs, g, g, c),
                                         dtype=store_dtype, fill_value=0, **common)
                arr.attrs["bfloat16_bits"] = spec.dtype == "bfloat16"
            group.create_array(flipped_key("cls"), shape=(n, c), chunks=(cs, c), dtype=store_dtype, fill_value=0,
                               **common)
        if spec.target_hw is not None:
            h, w = spec.target_hw
            # Sparse targets (LiDAR: ~8 % of pixels valid) compress ~30x and decode in well under a millisecond.
            targets = common if spec.compressor != "none" else dict(compressors=_compressors("zstd", 1))
            depth = group.create_array("depth", shape=(n, h, w), chunks=(cs, h, w), dtype="uint16", fill_value=0,
                                       **targets)
            depth.attrs["scale"] = spec.depth_scale
        flags = dict(chunks=(cs,))
        group.create_array("skipped", shape=(n,), dtype="uint8", fill_value=0, **flags)
        group.create_array("skip_reason", shape=(n,), dtype=str, **flags)
        group.create_array("done", shape=(n,), dtype="uint8", fill_value=0, **flags)
        for name in INDEX_FIELDS:
            values = np.asarray(index[name])
            dtype = str if values.dtype.kind in "UOT" else values.dtype
            arr = group.create_array(f"index/{name}", shape=values.shape, dtype=dtype,
                                     chunks=(max(n, 1),) + values.shape[1:])
            if n:
                with zarr.config.set({"array.write_empty_chunks": True}):
                    arr[...] = values
        group.attrs.update({
            **spec.attrs,
            "n": n, "layers": list(spec.layers), "chunk_size": cs, "dtype": spec.dtype, "grid": g, "width": c,
            "complete": False, "flipped": spec.flipped,
        })
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
        """The shapes this store was created with (for `estimate_bytes` of its pending chunks)."""
        codecs = self.array(layer_key(self.layers[0])).metadata.codecs
        return StoreSpec(n=self.n, layers=self.layers, grid=int(self.attrs["grid"]), width=int(self.attrs["width"]),
                         dtype=self.dtype, chunk_size=self.chunk_size,
                         compressor="none" if len(codecs) <= 2 else "zstd",  # bytes (+ crc32c): raw
                         target_hw=tuple(self.group["depth"].shape[1:]) if self.has_depth else None,
                         flipped=self.has_flipped)

    # ---- chunks -------------------------------------------------------------------------------------------
    @property
    def n_chunks(self) -> int:
        return -(-self.n // self.chunk_size)

    def chunk_range(self, c: int) -> tuple[int, int]:
        if not 0 <= c < self.n_chunks:
            raise StoreError(f"chunk {c} out of range 0..{self.n_chunks - 1} in {self.url}")
        return c * self.chunk_size, min((c + 1) * self.chunk_size, self.n)

    def done_flags(self) -> np.ndarray:
        """1 per finished sample. A chunk of `done` whose file does not decode counts as not done (its chunk is then
        extracted again), so one damaged flag file never makes the whole store unreadable."""
        return self._done_flags()[0]

    def _done_flags(self) -> tuple[np.ndarray, dict[int, str]]:
        """(flags, {chunk: why its flags do not decode})."""
        if not self.n:
            return np.zeros(0, np.uint8), {}
        arr = self.group["done"]
        try:
            return arr[:], {}
        except Exception:  # a damaged flag file: read chunk by chunk
            flags, bad = np.zeros(self.n, np.uint8), {}
            for c in range(self.n_chunks):
                a, b = self.chunk_range(c)
                try:
                    flags[a:b] = arr[a:b]
                except Exception as err:
                    bad[c] = f"{type(err).__name__}: {err}"
            return flags, bad

    def chunk_done(self, c: int) -> bool:
        """Whether chunk `c` is finished (its one `done` file read; a damaged one reads as not finished)."""
        try:
            return bool(self.group["done"][slice(*self.chunk_range(c))].all())
        except Exception:
            return False

    def pending_chunks(self) -> list[int]:
        done = self.done_flags()
        return [c for c in range(self.n_chunks) if not done[slice(*self.chunk_range(c))].all()]

    # ---- who writes which chunk ---------------------------------------------------------------------------
    @property
    def claims_dir(self) -> Path | None:
        """Where the chunk claims of this store live: a hidden folder beside it (outside the Zarr hierarchy, so
        Zarr, the fingerprint and the chunk files never see it); None for a store that is not on a local disk."""
        folder = local_path(self.url)
        return None if folder is None else folder.with_name(f".{folder.name}.claims")

    @contextlib.contextmanager
    def claim_chunk(self, c: int):
        """Claim chunk `c` for writing (`pipeline.claims`): yields a `Claim` whose `acquired` says whether this
        caller may write it; a live holder elsewhere keeps it. Files a dead writer of this chunk left half-made
        (Zarr's `*.partial`) are removed once the claim is held. Not on a local disk: always acquired."""
        self.chunk_range(c)
        if self.claims_dir is None:
            yield claims.Claim(Path(self.url), True, {})
            return
        with claims.claimed(self.claims_dir / str(c), f"extracting chunk {c} of {Path(self.url).name}") as claim:
            if claim.acquired:
                self._remove_partials(c)
            yield claim

    def release_claims(self) -> None:
        """Remove the claim files nobody holds, and their folder once empty (after the store is finished)."""
        if self.claims_dir is not None:
            claims.sweep(self.claims_dir)

    def _chunk_file(self, name: str, c: int) -> Path | None:
        folder = local_path(self.url)
        if folder is None:
            return None
        arr = self.array(name)  # opened once, not its zarr.json read again for every claimed chunk
        return folder / arr.path / arr.metadata.chunk_key_encoding.encode_chunk_key((c,) + (0,) * (arr.ndim - 1))

    def _remove_partials(self, c: int) -> None:
        """Zarr writes every chunk to `<key>.<hex>.partial` and renames it over the key; a writer killed between the
        two leaves the partial file behind, which nothing reads but which is not part of the store."""
        for name in self.data_arrays() + ["done"]:
            path = self._chunk_file(name, c)
            if path is not None and path.parent.is_dir():
                for partial in path.parent.glob(f"{path.name}.*.partial"):
                    partial.unlink(missing_ok=True)

    def reset_chunks(self, chunks: Iterable[int]) -> None:
        """Mark chunks not done (before they are written again: a kill during the rewrite then leaves them pending)."""
        for c in chunks:
            a, b = self.chunk_range(c)
            with zarr.config.set({"array.write_empty_chunks": True}):
                self.group["done"][a:b] = np.zeros(b - a, np.uint8)

    @property
    def complete(self) -> bool:
        return bool(self.group.attrs.get("complete", False))

    def write_chunk(
        self,
        c: int,
        tokens: dict[int, torch.Tensor],
        cls: torch.Tensor,
        depth: np.ndarray | None = None,
        skipped: np.ndarray | None = None,
        reasons: list[str] | None = None,
        flipped: tuple[dict[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """Write one whole chunk (its data first, then its `done` flags). `flipped`: (tokens, cls) of the
        mirrored images, for a store created with `flipped=True`."""
        # Zarr skips writing chunks equal to the fill value unless told otherwise (the setting is not stored
        # with the array); `verify` relies on every done chunk existing, so write them all.
        try:
            with zarr.config.set({"array.write_empty_chunks": True}):
                self._write_chunk(c, tokens, cls, depth, skipped, reasons, flipped)
        except Exception as err:
            # Zarr writes each chunk file to a temporary name and renames it, so a full disk leaves the chunk's old
            # files (or none) and its done flags at 0: the chunk stays pending and is written again next run.
            full = disk_full_error(err, self.url, f"writing chunk {c}")
            if full is not None:
                raise full from None
            raise

    def _write_chunk(self, c, tokens, cls, depth, skipped, reasons, flipped) -> None:
        a, b = self.chunk_range(c)
        for k in self.layers:
            if tokens[k].shape[0] != b - a:
                raise StoreError(f"chunk {c}: layer {k} has {tokens[k].shape[0]} rows, expected {b - a}")
        if self.has_depth and depth is None:
            raise StoreError(f"chunk {c}: {self.url} stores training targets but none were given")
        if self.has_flipped != (flipped is not None):
            raise StoreError(f"chunk {c}: {self.url} " + ("stores mirrored-image features but none were given"
                                                           if self.has_flipped else "stores no mirrored features"))
        writes = {layer_key(k): lambda k=k: self._encode(tokens[k]) for k in self.layers}
        writes["cls"] = lambda: self._encode(cls)
        if flipped is not None:
            f_tokens, f_cls = flipped
            writes.update({flipped_key(layer_key(k)): lambda k=k: self._encode(f_tokens[k]) for k in self.layers})
            writes[flipped_key("cls")] = lambda: self._encode(f_cls)
        if self.has_depth:
            scale = self.depth_scale
            writes["depth"] = lambda: np.clip(np.round(depth * scale), 0, 65535).astype(np.uint16)
        writes["skipped"] = lambda: np.zeros(b - a, np.uint8) if skipped is None else skipped.astype(np.uint8)
        writes["skip_reason"] = lambda: np.array(reasons if reasons is not None else [""] * (b - a), dtype=str)

        def put(name: str) -> None:
            self._put(name, c, writes[name]())

        from pipeline.devices import usable_cores

        # The arrays are independent files, so they are converted, compressed and written concurrently (numpy,
        # torch and zstd release the GIL): the write phase then uses every core instead of one. Only after all
        # of them have landed are the chunk's `done` flags written, so a kill mid-write leaves the chunk pending.
        with ThreadPoolExecutor(max_workers=min(len(writes), usable_cores())) as pool:
            for future in [pool.submit(put, name) for name in writes]:
                future.result()
        self._put("done", c, np.ones(b - a, np.uint8))

    def _put(self, name: str, c: int, values: np.ndarray) -> None:
        """Chunk `c` of array `name`: its file written directly (`_ChunkFiles.write`, the bytes Zarr writes, without
        its event loop), or through Zarr where that cannot be."""
        direct = self._chunk_files(name)
        if direct is None or not direct.write(c, values):
            self.array(name)[slice(*self.chunk_range(c))] = values

    def mark_complete(self) -> None:
        pending = self.pending_chunks()
        if pending:
            raise StoreError(f"{self.url}: chunks {pending[:10]} are not done; cannot mark complete")
        try:
            self.group.attrs["complete"] = True
        except Exception as err:
            full = disk_full_error(err, self.url, "marking the store complete")
            if full is not None:
                raise full from None
            raise
        self.attrs["complete"] = True

    # ---- reading ------------------------------------------------------------------------------------------
    def _encode(self, t: torch.Tensor) -> np.ndarray:
        t = t.detach().cpu()
        if self.dtype == "bfloat16":
            return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return t.to(torch.float16).numpy()

    def _decode(self, arr: np.ndarray) -> torch.Tensor:
        if self.dtype == "bfloat16":
            return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(arr))

    def array(self, name: str) -> zarr.Array:
        """The store's array `name`, opened once per `FeatureStore` (its metadata does not change). It writes every
        chunk, even one equal to the fill value (`verify` relies on every done chunk existing; Zarr takes this
        setting when an array is opened)."""
        arr = self._arrays.get(name)
        if arr is None:
            arr = self._arrays[name] = self.group[name].with_config({"write_empty_chunks": True})
        return arr

    def _select(self, name: str, sel):
        if isinstance(sel, slice):
            step_one = sel.step in (None, 1)
            start = 0 if sel.start is None else sel.start
            if step_one and start % self.chunk_size == 0 and sel.stop == min(start + self.chunk_size, self.n):
                direct = self._chunk_files(name)
                if direct is not None:  # one whole chunk: its file read and decoded here
                    return direct.read(start // self.chunk_size, sel.stop - start)
            return self.array(name)[sel]
        return self.array(name).oindex[np.asarray(sel)]

    def reads_rows(self, name: str) -> bool:
        """Whether `chunk_rows` can read this array: uncompressed, on a local disk."""
        files = self._chunk_files(name)
        return files is not None and files.decoder is None

    def chunk_rows(self, name: str, c: int) -> ChunkRows:
        """Chunk `c` of an uncompressed array on a local disk (`reads_rows`), for reads of single rows straight
        into the caller's memory (`ChunkRows`: the streaming loader's path)."""
        if not self.reads_rows(name):
            raise StoreError(f"{self.url}/{name} is compressed or not on a local disk: read whole chunks")
        return ChunkRows(self._chunk_files(name), c)

    def _chunk_files(self, name: str) -> "_ChunkFiles | None":
        if name not in self._direct:
            self._direct[name] = _ChunkFiles.of(self.array(name), self.url)
        return self._direct[name]

    def read(self, sel: slice | np.ndarray | Iterable[int], layers: Iterable[int] | None = None,
             depth: bool = True, flipped: bool = False, raw_depth: bool = False) -> dict:
        """A batch: {"tokens": {k: (B, g, g, C)}, "global": (B, C)} in the stored float dtype, plus
        "depth" (B, H, W) float32 metres (0 = invalid) when the store has targets, and "index" (B,) positions.
        `flipped=True` adds the mirrored images' "flipped_tokens" and "flipped_global" (stores with them only).
        `raw_depth=True`: "depth" as stored instead, int16 holding the uint16 values (metres x `depth_scale`),
        for a reader that converts it once, later (the streaming loader converts whole batches).

        `sel` is a slice (fastest: whole chunks) or sorted sample positions."""
        layers = self.layers if layers is None else tuple(layers)
        unknown = sorted(set(layers) - set(self.layers))
        if unknown:
            raise StoreError(f"layers {unknown} are not in {self.url} (it holds {list(self.layers)})")
        if not isinstance(sel, slice):
            sel = np.asarray(list(sel) if not isinstance(sel, np.ndarray) else sel, dtype=np.int64)
        batch = {
            "tokens": {k: self._decode(self._select(layer_key(k), sel)) for k in layers},
            "global": self._decode(self._select("cls", sel)),
            "index": np.arange(self.n)[sel],
        }
        if depth and self.has_depth:
            stored = self._select("depth", sel)
            batch["depth"] = (torch.from_numpy(np.ascontiguousarray(stored).view(np.int16)) if raw_depth
                              else torch.from_numpy(depth_metres(stored, self.depth_scale)))
        if flipped:
            if not self.has_flipped:
                raise StoreError(f"{self.url} holds no mirrored-image features (extracted with views.flip=features)")
            batch["flipped_tokens"] = {k: self._decode(self._select(flipped_key(layer_key(k)), sel)) for k in layers}
            batch["flipped_global"] = self._decode(self._select(flipped_key("cls"), sel))
        return batch

    def read_chunk(self, c: int, layers: Iterable[int] | None = None, depth: bool = True,
                   flipped: bool = False, raw_depth: bool = False) -> dict:
        """`read` of one whole chunk: on a local disk each array's chunk file is read and decoded directly
        (`_ChunkFiles`), the fastest read there is."""
        return self.read(slice(*self.chunk_range(c)), layers, depth, flipped, raw_depth)

    @property
    def depth_scale(self) -> float:
        """Stored depth values per metre (training splits only)."""
        return float(self.array("depth").attrs["scale"])

    def index(self, skips: bool = True):
        """The per-sample index as a pandas DataFrame (one row per stored sample). `skips=False` leaves out the
        `skipped` and `skip_reason` columns, which extraction writes chunk by chunk: reading them takes a file per
        chunk (0.22 s of the 0.3 s an index of KITTI's 23,158 training samples takes), and an extraction task,
        which reads the index for the paths and views of its chunks, need not pay that on every task."""
        import pandas as pd

        cols = {}
        for name in INDEX_FIELDS:
            if name == "view_aug" and f"index/{name}" not in self.group:  # written before augmentation existed
                values = np.tile(np.asarray(IDENTITY_AUG), (self.n, 1))
            elif self.n:
                values = self.group[f"index/{name}"][:]
            else:
                values = np.zeros((0, *{"orig_hw": (2,), "view": (5,), "view_aug": (6,)}.get(name, ())))
            if name == "view_aug":
                for j, part in enumerate(VIEW_AUG_COLUMNS):
                    cols[part] = values[:, j]
            elif name == "orig_hw":
                cols["orig_h"], cols["orig_w"] = values[:, 0], values[:, 1]
            elif name == "view":
                for j, part in enumerate(("view_k", "view_top", "view_left", "view_h", "view_w")):
                    cols[part] = values[:, j]
            else:
                cols[name] = values
        df = pd.DataFrame(cols)
        if not skips:
            return df
        # A damaged chunk of the skip records reads as "not skipped" (the chunk is extracted again: `verify`).
        df["skipped"] = self._read_tolerant("skipped", 0).astype(bool) if self.n else []
        df["skip_reason"] = self._read_tolerant("skip_reason", "") if self.n else []
        return df

    def _read_tolerant(self, name: str, fill) -> np.ndarray:
        arr = self.group[name]
        try:
            return arr[:]
        except Exception:
            parts = []
            for c in range(self.n_chunks):
                a, b = self.chunk_range(c)
                try:
                    parts.append(arr[a:b])
                except Exception:
                    parts.append(np.full(b - a, fill, dtype=arr.dtype if fill == 0 else object))
            return np.concatenate(parts)

    # ---- verification ---------------------------------------------------------------------------------------
    def data_arrays(self) -> list[str]:
        names = [layer_key(k) for k in self.layers] + ["cls", "skipped", "skip_reason"]
        if self.has_flipped:
            names += [flipped_key(layer_key(k)) for k in self.layers] + [flipped_key("cls")]
        return names + (["depth"] if self.has_depth else [])

    def verify(self, chunks: Iterable[int] | None = None, quick: bool = False) -> dict:
        """Check that every done chunk of every data array (and of `done`) exists and decodes, that the index arrays
        decode, and that the counts match. `chunks`: decode only these of the done chunks (the others are checked
        for existence only); None: all.

        `quick=True` (what extraction does with a store it reuses, `cache.verify: quick`) reads a small part of the
        store: the `done` flags; each done chunk file of an uncompressed array checked by its size (a cut or
        missing file is found, a changed byte is not: every reader checks the chunk's CRC-32C and names the
        file); compressed arrays other than the features (depth targets, flags, the index: a few % of the store)
        decoded; and every array of the chunks a killed writer may have left behind (a claim file or a `*.partial`
        file beside the chunk) decoded. `chunks` is ignored.

        Zarr returns the fill value for a chunk whose file is gone, so existence is checked explicitly. The report's
        `damaged_chunks` are the chunks extraction writes again; `damaged_index` the index arrays it rewrites. Every
        chunk of a data array carries a CRC-32C, so a changed byte is found too (stores written before the checksum
        existed: only a change that breaks decoding)."""
        problems: list[str] = []
        damaged: set[int] = set()
        done, bad_flags = self._done_flags()
        done_chunks = [c for c in range(self.n_chunks) if done[slice(*self.chunk_range(c))].all()]
        if quick:
            chunks = self._left_behind()
        decode = set(done_chunks if chunks is None else chunks)
        ids = self._ids()
        folder = local_path(self.url)

        def where(c: int) -> str:
            a, b = self.chunk_range(c)
            return f"samples ({a}, {b})" + (f": {ids[a]} .. {ids[b - 1]}" if ids is not None and b > a else "")

        for c, why in sorted(bad_flags.items()):
            problems.append(f"done: chunk {c} does not decode ({where(c)}): {why}")
            damaged.add(c)
        for name in self.data_arrays() + ["done"]:
            try:
                arr = self.group[name]
            except Exception as err:  # its zarr.json is gone or damaged: extraction cannot repair that
                problems.append(f"{name}: the array's metadata does not load ({type(err).__name__}: {err}); delete "
                                f"the store and extract it again")
                continue
            encoding = arr.metadata.chunk_key_encoding
            files = _ChunkFiles.of(arr, self.url) if quick else None
            # quick: a raw chunk file has one size; compressed features are only looked at; the rest is decoded
            size = (int(np.prod(files.chunk_shape)) * files.dtype.itemsize + 4 * files.checksum
                    if files is not None and files.decoder is None else None)
            decode_all = quick and size is None and not (name.startswith("tokens/") or "/tokens/" in name
                                                         or name.endswith("cls"))
            for c in done_chunks:
                key = f"{arr.path}/{encoding.encode_chunk_key((c,) + (0,) * (arr.ndim - 1))}"
                if folder is not None:
                    try:
                        found = os.stat(folder / key).st_size
                    except FileNotFoundError:
                        found = None
                else:
                    found = 0 if sync(self.group.store.exists(key)) else None
                if found is None:
                    problems.append(f"{name}: chunk {c} (samples {self.chunk_range(c)}) is missing ({key})")
                    damaged.add(c)
                    continue
                if quick and size is not None and found != size and c not in decode:
                    problems.append(f"{name}: chunk {c} ({where(c)}; file {key}) has {found} bytes where the chunk "
                                    f"has {size}")
                    damaged.add(c)
                    continue
                if quick and folder is not None and size is None and not decode_all and found <= 4:
                    problems.append(f"{name}: chunk {c} ({where(c)}; file {key}) is empty ({found} bytes)")
                    damaged.add(c)
                    continue
                if c not in decode and not decode_all:
                    continue
                try:
                    arr[slice(*self.chunk_range(c))]
                except Exception as err:  # a truncated or corrupt chunk file
                    problems.append(f"{name}: chunk {c} does not decode ({where(c)}; file {key}): "
                                    f"{type(err).__name__}: {err}")
                    damaged.add(c)
        n_done = int(done.sum())
        try:
            n_skipped = int(self.group["skipped"][:].sum()) if self.n else 0
        except Exception:  # reported per chunk above
            n_skipped = -1
        if self.complete and n_done != self.n:
            problems.append(f"store is marked complete but only {n_done} of {self.n} samples are done")
        damaged_index = []
        for name in INDEX_FIELDS:
            key = f"index/{name}"
            try:
                if key not in self.group:
                    if name != "view_aug":  # the one field older stores may lack
                        problems.append(f"{key} is missing")
                    continue
                arr = self.group[key]
                if arr.shape[0] != self.n:
                    problems.append(f"{key} has {arr.shape[0]} rows, expected {self.n}")
                    continue
                if self.n:
                    arr[:]
            except Exception as err:
                problems.append(f"{key}: does not decode (samples (0, {self.n}): the whole index column): "
                                f"{type(err).__name__}: {err}")
                damaged_index.append(name)
        return {
            "url": self.url, "n": self.n, "done": n_done, "skipped": n_skipped, "chunks": self.n_chunks,
            "done_chunks": len(done_chunks), "complete": self.complete, "fingerprint": self.fingerprint,
            "problems": problems, "ok": not problems and n_done == self.n,
            "damaged_chunks": sorted(damaged), "damaged_index": damaged_index,
        }

    def _left_behind(self) -> set[int]:
        """Chunks a writer may not have finished cleanly: those with a claim file beside the store (a claim is
        removed when its chunk is written; one that stays belongs to a writer that died, or is writing now) or a
        `*.partial` file of Zarr's or `_ChunkFiles.write`'s beside a chunk file."""
        out: set[int] = set()
        if self.claims_dir is not None and self.claims_dir.is_dir():
            out |= {int(p.name) for p in self.claims_dir.iterdir() if p.name.isdigit()}
        folder = local_path(self.url)
        if folder is not None:
            for partial in folder.rglob("*.partial"):
                # <array>/c/<i>/0/0/0.<hex>.partial, or <array>/c/<i>.<hex>.partial for a 1-D array
                rel = partial.relative_to(folder).parts
                if "c" in rel[:-1]:
                    head = rel[rel.index("c") + 1].split(".")[0]
                    if head.isdigit():
                        out.add(int(head))
        return {c for c in out if 0 <= c < self.n_chunks}

    def _ids(self) -> np.ndarray | None:
        try:
            return self.group["index/id"][:] if self.n else None
        except Exception:
            return None

    # ---- the files the samples came from --------------------------------------------------------------------
    SOURCES = ("image", "depth")

    def sources(self) -> dict[str, np.ndarray] | None:
        """{"image", "depth"}: (N, 2) int64 (size, mtime in ns) of each sample's files when it was extracted
        (`pipeline.fingerprint.file_signature`); None for a store written before they were recorded (or whose
        record does not decode: it is then recorded again)."""
        try:
            return {k: self.group[f"sources/{k}"][:] for k in self.SOURCES} if "sources" in self.group else None
        except Exception:
            return None

    def record_sources(self, signatures: dict[str, np.ndarray]) -> None:
        """Record (or replace) the files' signatures: arrays beside the index, not part of the fingerprint, so a
        store without them (older) is reused as before and gets them then."""
        with zarr.config.set({"array.write_empty_chunks": True}):
            for k in self.SOURCES:
                values = np.asarray(signatures[k], np.int64).reshape(self.n, 2)
                arr = self.group.create_array(f"sources/{k}", shape=values.shape, dtype="int64",
                                              chunks=(max(self.n, 1), 2), overwrite=True)
                if self.n:
                    arr[...] = values

    def rewrite_index(self, index: dict[str, np.ndarray], names: Iterable[str]) -> None:
        """Write the index columns `names` again from a fresh plan of the same split (repair of a damaged column);
        the plan must have this store's rows."""
        for name in names:
            values = np.asarray(index[name])
            if len(values) != self.n:
                raise StoreError(f"cannot repair index/{name} of {self.url}: the split now plans {len(values)} "
                                 f"samples, the store holds {self.n}; delete the store and extract it again")
            with zarr.config.set({"array.write_empty_chunks": True}):
                self.group[f"index/{name}"][...] = values
