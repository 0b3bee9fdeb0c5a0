"""The files a store was extracted from: their signatures (size, mtime) recorded beside the index, compared on
reuse, and the chunks to extract again when they changed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline import datasets
from pipeline.config import Config
from pipeline.fingerprint import data_roots, file_signature
from pipeline.store import FeatureStore, StoreError

log = logging.getLogger(__name__)


def file_signatures(index) -> dict[str, np.ndarray]:
    """{"image", "depth"}: each row's files by (size, mtime) (`pipeline.fingerprint.file_signature`)."""
    return {"image": file_signature(index["image_path"]), "depth": file_signature(index["depth_path"])}


def source_changes(cfg: Config, split: str, store: FeatureStore) -> dict:
    """What differs between the files `store` was extracted from and those there now: {"roots": [(key, then,
    now)], "rows": positions whose image or depth file changed (size or mtime) or appeared or went, "examples":
    a few "path: what" lines, "new_frames": frames skipped at planning (image missing or unreadable) whose image
    is now there, "now": the current signatures}. `rows` is empty for a store that records no signatures."""
    out = {"roots": [], "rows": np.zeros(0, np.int64), "examples": [], "new_frames": [], "now": None}
    recorded_roots = store.attrs.get("data_roots")
    if recorded_roots:
        now_roots = data_roots(cfg, split)
        out["roots"] = [(k, recorded_roots.get(k), v) for k, v in now_roots.items() if recorded_roots.get(k) != v]
    index = store.index(skips=False)
    now = out["now"] = file_signatures(index)
    then = store.sources()
    if then is not None:
        rows = set()
        for kind, column in (("image", "image_path"), ("depth", "depth_path")):
            differ = np.flatnonzero((then[kind] != now[kind]).any(axis=1))
            rows.update(differ.tolist())
            for i in differ[:3]:
                out["examples"].append(f"{index[column].iloc[i]}: {_describe(then[kind][i], now[kind][i])}")
        out["rows"] = np.array(sorted(rows), np.int64)
    at_planning = {s["id"] for s in store.attrs.get("skipped_at_planning") or []}
    if at_planning:
        for sample in datasets.read_split(cfg.data, split):
            if sample.id in at_planning and Path(sample.image_path).is_file():
                out["new_frames"].append(f"{sample.id} ({sample.image_path})")
    return out


def _describe(then: np.ndarray, now: np.ndarray) -> str:
    if then[0] < 0:
        return f"now there ({now[0]} bytes), missing at extraction"
    if now[0] < 0:
        return "gone"
    if then[0] != now[0]:
        return f"{then[0]} -> {now[0]} bytes"
    return "modified (same size, another modification time)"


def changed_chunks(cfg: Config, split: str, store: FeatureStore) -> list[int]:
    """The chunks to extract again because their samples' files changed (`source_changes`), their new signatures
    recorded; a `StoreError` when the store cannot follow the change in place (other data roots, frames it has no
    row for), unless `cache.on_data_change: keep`."""
    changes = source_changes(cfg, split, store)
    if store.sources() is None:  # a store from before signatures: record what is there now
        store.record_sources(changes["now"])
        if not store.attrs.get("data_roots"):
            store.record_data_roots(data_roots(cfg, split))
        return []
    rows, keep = changes["rows"], cfg.cache.on_data_change == "keep"
    what = []
    if changes["roots"]:
        what.append("; ".join(f"data.{k} was {a} and is now {b}" for k, a, b in changes["roots"]))
    if len(rows):
        what.append(f"{len(rows)} of its {store.n} samples' files changed since it was extracted (e.g. "
                    + "; ".join(changes["examples"][:3]) + ")")
    if changes["new_frames"]:
        what.append(f"{len(changes['new_frames'])} frames skipped at planning now have their image (e.g. "
                    + ", ".join(changes["new_frames"][:3]) + ")")
    if not what:
        return []
    said = f"{store.url} ({split}): " + "; ".join(what)
    if keep:
        log.warning("%s; cache.on_data_change is keep: the store is used as it is", said)
        return []
    if changes["roots"] or changes["new_frames"]:
        raise StoreError(f"{said}. The store was extracted from other files and cannot follow this change in place: "
                         f"delete {store.url} (or set another cache.root) to extract the split again, or set "
                         "cache.on_data_change=keep to use it as it is")
    chunks = sorted({int(r) // store.chunk_size for r in rows})
    log.warning("%s: extracting the %d chunks that hold them again", said, len(chunks))
    store.record_sources(changes["now"])  # a kill before the chunks are written leaves them pending: no loss
    return chunks
