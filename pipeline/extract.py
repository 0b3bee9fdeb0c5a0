"""Stage 1: run the frozen encoder once over a split and write its features into a feature store.

`plan_split` (`pipeline/planning.py`) decides a split's samples and views; `prepare_store` reuses the store of
this config's fingerprint (repairing what `verify` and `pipeline/sources.py` find) or creates it. `extract_chunks`
fills chunks as one pipeline, `extract_claimed` under the chunks' claims (the Prefect flow maps it over runs of
chunks on Dask workers). A chunk's `done` flags follow its data: a killed run resumes with the missing chunks.
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from pipeline import datasets, synth
from pipeline.config import Config
from pipeline.datasets import DatasetError
from pipeline.devices import decode_workers_for, encoder_settings, reuse_freed_memory
from pipeline.diskspace import ensure_space
from pipeline.layout import SPLITS, RunContext, encoder_for, finalize_store
from pipeline.planning import Plan, load_view, plan_split, store_spec, view_of_row
from pipeline.sources import changed_chunks, file_signatures
from pipeline.store import FeatureStore

log = logging.getLogger(__name__)


def prepare_store(ctx: RunContext | Config, split: str, plan: Plan | None = None) -> tuple[FeatureStore, bool]:
    """The store of this config's split, and whether it existed: the one with this fingerprint (finished or
    resumable), else a new one created from the split's plan (race-free: two runs creating it share one store).
    A reused store is checked first (`verify`, quick unless `cache.verify: full`): its damaged chunks and those of
    samples whose files changed (`pipeline.sources`) are marked pending again, a damaged index column is written
    again from the plan, and the chunks found sound are marked verified (`finalize_store` skips them)."""
    ctx = RunContext.of(ctx)
    store = ctx.reuse_store(split)
    if store is None:
        plan = plan_split(ctx.cfg, split) if plan is None else plan
        spec, url = store_spec(ctx, split, plan), ctx.store_url(split)
        log.info("creating feature store %s: %d samples in %d chunks", url, spec.n, -(-spec.n // spec.chunk_size))
        store = FeatureStore.create(url, spec, plan.index)
        if not store.created:
            log.info("another process created %s at the same time; extracting its pending chunks together", url)
        else:
            store.record_sources(file_signatures(plan.index))
        return store, not store.created
    report = store.verify(quick=ctx.cfg.cache.verify == "quick")
    damaged = report["damaged_chunks"]
    if report["damaged_index"]:
        log.warning("%s: repairing index columns %s", store.url, report["damaged_index"])
        store.rewrite_index(plan_split(ctx.cfg, split).index, report["damaged_index"])
    if damaged:
        log.warning("%s: %d damaged chunks %s are extracted again: %s", store.url, len(damaged), damaged[:10],
                    "; ".join(report["problems"][:3]))
    changed = changed_chunks(ctx.cfg, split, store)
    again = sorted(set(damaged) | set(changed))
    for c in again:
        with store.claim_chunk(c) as claim:
            if claim.acquired:  # else another run is writing it again already
                store.reset_chunks([c])  # and the store is no longer complete: training refuses it until done
    store.mark_verified(set(range(store.n_chunks)) - set(again) - set(store.pending_chunks()))
    return store, True


def prepare_stores(ctx: RunContext | Config, splits=SPLITS) -> dict[str, tuple[FeatureStore, bool]]:
    """`prepare_store` for each split, once what they still need fits on the disk (`ensure_space`): else nothing
    is written."""
    ctx = RunContext.of(ctx)
    plans = ensure_space(ctx, splits)
    return {split: prepare_store(ctx, split, plans.get(split)) for split in splits}


CLAIM_WINDOW = 64  # chunks claimed, and extracted as one pipeline, at a time


def extract_claimed(cfg: Config, url: str, chunks: list[int], torch_threads: int | None = None) -> list[dict]:
    """`extract_chunks` under each chunk's claim, so that concurrent runs never write, or redo, each other's chunks.
    One summary per chunk; with `held_by` when a live process holds it, `already_done` when another run did it."""
    store = FeatureStore.open(url, mode="r+")
    results = {}
    for start in range(0, len(chunks), CLAIM_WINDOW):  # a claim is an open file: a bounded number at a time
        mine = []
        with contextlib.ExitStack() as held:
            for c in chunks[start:start + CLAIM_WINDOW]:
                claim = held.enter_context(store.claim_chunk(c))
                if not claim.acquired:
                    results[c] = {"chunk": c, "samples": 0, "skipped": 0, "held_by": claim.describe_holder()}
                elif store.chunk_done(c):
                    results[c] = {"chunk": c, "samples": 0, "skipped": 0, "already_done": True}
                else:
                    mine.append(c)
            if mine:
                results.update({r["chunk"]: r for r in extract_chunks(cfg, url, mine, torch_threads)})
    return [results[c] for c in chunks]


def finish_store(cfg: Config, url: str, torch_threads: int | None = None, poll: float = 1.0) -> list[int]:
    """Return once every chunk of the store is done: pending chunks extracted here, those another live process
    holds waited for (or extracted here when it dies). Returns the chunks this call extracted."""
    store = FeatureStore.open(url, mode="r+")
    extracted, polls = [], 0
    while pending := store.pending_chunks():
        held = {}
        for result in extract_claimed(cfg, url, pending, torch_threads):
            if "held_by" in result:
                held[result["chunk"]] = result["held_by"]
            elif not result.get("already_done"):
                extracted.append(result["chunk"])
        if held:
            if polls % max(1, round(60 / poll)) == 0:  # once a minute: who this run is waiting for
                log.info("%s: waiting for %d chunks that another run is extracting (chunk %d: %s)", url, len(held),
                         *next(iter(held.items())))
            polls += 1
            time.sleep(poll)
    return extracted


# ---- one chunk --------------------------------------------------------------------------------------------------
def _load_row(store: FeatureStore, row, encoder, layout: str, target_hw):
    """Decode, crop and preprocess one stored sample (runs in a loader thread)."""
    sample = datasets.sample_from_row(row._asdict(), store.attrs["split_file"])
    crop, depth = load_view(sample, view_of_row(row), (row.orig_h, row.orig_w), layout, target_hw)
    return encoder.preprocess(crop)[0], depth


def _features(rows: int, layers, grid: int, width: int, dtype: torch.dtype, device, flipped: bool) -> list:
    """[(tokens {k: (rows, g, g, C)}, global (rows, C))] of a chunk's images, and of their mirrored images."""
    return [({k: torch.zeros(rows, grid, grid, width, dtype=dtype, device=device) for k in layers},
             torch.zeros(rows, width, dtype=dtype, device=device)) for _ in range(2 if flipped else 1)]


def _put_rows(into: torch.Tensor, positions: list[int], rows: torch.Tensor) -> None:
    """`into[positions] = rows`, consecutive positions as one copy: on the host numpy's (one thread, the GIL
    released, where torch's OpenMP threads would spin on the cores the decode pool needs)."""
    if positions[-1] - positions[0] == len(positions) - 1:
        if into.device.type == "cpu":
            as_bytes = lambda t: t.view(torch.uint8).numpy()
            np.copyto(as_bytes(into[positions[0]:positions[-1] + 1]), as_bytes(rows.contiguous()))
        else:
            into[positions[0]:positions[-1] + 1].copy_(rows)
    else:
        into[torch.tensor(positions, device=into.device)] = rows


def extract_chunks(cfg: Config, url: str, chunks: list[int], torch_threads: int | None = None,
                   encoder=None, device_chunks: bool | None = None) -> list[dict]:
    """Encode and write chunks of a store as one pipeline: a decode pool (`decode_workers_for`) running up to a
    chunk and a batch ahead of the encoder; the encoder on whole batches (`encoder_settings`), on CUDA from pinned
    memory, its features gathered on the device and copied back once per chunk (`device_chunks`, default on CUDA);
    a writer thread writing a finished chunk (data, then its `done` flags) while the next one is encoded. `encoder`:
    default `encoder_for(cfg)`, or a stand-in with its interface. One {"chunk", "samples", "skipped"} a chunk."""
    if torch_threads:
        torch.set_num_threads(torch_threads)
    reuse_freed_memory()  # every chunk's images, features and encoded bytes from freed memory, not new pages
    run = _ChunkEncoder(cfg, FeatureStore.open(url, mode="r+"), chunks,
                        encoder_for(cfg) if encoder is None else encoder, device_chunks)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if run.cuda and run.settings.tf32:  # what autocast leaves in fp32 as TF32; restored after
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    results, writing = [], None
    try:
        with ThreadPoolExecutor(decode_workers_for(cfg), thread_name_prefix="decode") as run.pool, \
                ThreadPoolExecutor(1, thread_name_prefix="write") as writer:
            for chunk in chunks:
                features, depth, skipped, reasons = run.chunk(chunk)
                if writing is not None:
                    writing.result()  # one chunk in flight: the previous write (and any error it raised) first
                writing = writer.submit(run.store.write_chunk, chunk, *features[0], depth, skipped, reasons,
                                        flipped=features[1] if len(features) > 1 else None)
                results.append({"chunk": chunk, "samples": len(skipped), "skipped": int(skipped.sum())})
            if writing is not None:
                writing.result()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return results


class _ChunkEncoder:
    """One `extract_chunks` call's state: the samples in order, the decode futures running ahead, the batch of
    pixels staged for the device, and two sets of chunk buffers used in turn (the writer writes one while the next
    chunk fills the other), allocated once (a fresh page costs a fault on first touch)."""

    def __init__(self, cfg: Config, store: FeatureStore, chunks: list[int], encoder, device_chunks: bool | None):
        self.cfg, self.store, self.encoder, self.pool = cfg, store, encoder, None
        self.device = next(encoder.model.parameters()).device if hasattr(encoder, "model") else torch.device("cpu")
        self.cuda = self.device.type == "cuda"
        self.settings = encoder_settings(cfg.encoder)
        self.bs = self.settings.batch_size
        index = store.index(skips=False)  # the paths and views of the chunks' samples
        ranges = [store.chunk_range(c) for c in chunks]
        self.rows = {i: row for a, b in ranges for i, row in zip(range(a, b), index.iloc[a:b].itertuples())}
        self.todo = [i for a, b in ranges for i in range(a, b)]  # samples in order
        self.ahead = store.chunk_size + self.bs + decode_workers_for(cfg)  # samples decoded ahead of the encoder
        self.futures, self.submitted, self.done_samples = {}, 0, 0
        # In the stored dtype: each batch is converted once, as it is copied in.
        self.dtype = torch.bfloat16 if store.dtype == "bfloat16" else torch.float16
        shape = (store.chunk_size, store.layers, encoder.grid, encoder.width, self.dtype)
        self.sets = [(_features(*shape, "cpu", store.has_flipped),
                      np.zeros((store.chunk_size, *store.target_hw), np.float32) if store.has_depth else None)
                     for _ in range(2)]
        on_device = self.cuda if device_chunks is None else device_chunks
        self.gathered = _features(*shape, self.device, store.has_flipped) if on_device else None
        # One batch of pixels, reused, pinned on CUDA; refilled once the device has read it (`copied`).
        self.staged, self.copied = None, None

    def chunk(self, c: int):
        """Decode and encode chunk c into the next set of buffers: (features, depth, skipped, reasons)."""
        a, b = self.store.chunk_range(c)
        n = b - a
        skipped, reasons = np.zeros(n, bool), [""] * n
        self.sets.reverse()  # the set the write before last used (finished: `extract_chunks` waited for it)
        features = [({k: t[:n] for k, t in tokens.items()}, cls[:n]) for tokens, cls in self.sets[0][0]]
        depth = None if self.sets[0][1] is None else self.sets[0][1][:n]
        for start in range(0, n, self.bs):
            upto = min(self.done_samples + start + self.bs + self.ahead, len(self.todo))
            for i in self.todo[self.submitted:upto]:
                self.futures[i] = self.pool.submit(_load_row, self.store, self.rows[i], self.encoder,
                                                   self.cfg.data.layout, self.store.target_hw)
            self.submitted = max(self.submitted, upto)
            pixels, positions = [], []
            for i in range(start, min(start + self.bs, n)):
                try:
                    one, d = self.futures.pop(a + i).result()
                except DatasetError as err:
                    if self.cfg.data.on_error == "raise":
                        raise
                    skipped[i], reasons[i] = True, str(err)
                    log.warning("skipping %s: %s", self.rows[a + i].id, err)
                    continue
                pixels.append(one)
                positions.append(i)
                if depth is not None:
                    depth[i] = d
            if positions:
                self.encode_batch(pixels, positions, self.gathered or features)
        for (src_tokens, src_cls), (tokens, cls) in zip(self.gathered or [], features):
            for k, t in tokens.items():
                t.copy_(src_tokens[k][:n])  # to pageable host memory: the chunk's one wait for the device
            cls.copy_(src_cls[:n])
        if skipped.any():  # a skipped sample's rows are zeros, not what the buffer held from an earlier chunk
            at = torch.from_numpy(np.flatnonzero(skipped))
            for t in [t for tokens, cls in features for t in (*tokens.values(), cls)]:
                t[at] = 0
            if depth is not None:
                depth[skipped] = 0
        self.done_samples += n
        return features, depth, skipped, reasons

    def encode_batch(self, batch: list[torch.Tensor], positions: list[int], into: list) -> None:
        """One batch of preprocessed images through the encoder (and mirrored, for stores with mirrored
        features), its features put at `positions` of the chunk's buffers `into` (as `_features` makes them)."""
        if self.staged is None or self.staged.shape[1:] != batch[0].shape:
            self.staged = torch.empty((self.bs, *batch[0].shape), pin_memory=self.cuda)
        if self.copied is not None:
            self.copied.synchronize()  # the device has read the previous batch out of `staged`
        pixels = self.staged[:len(batch)]  # (B, 3, S, S)
        for j, one in enumerate(batch):  # numpy's copies, as in `_put_rows`
            np.copyto(pixels[j].numpy(), one.numpy())
        pixels = pixels.to(self.device, non_blocking=True)
        if self.cuda:
            self.copied = torch.cuda.Event()
            self.copied.record(torch.cuda.current_stream(self.device))
        # Mirroring the preprocessed pixels = preprocessing the mirrored view (the squash is symmetric).
        for view, (tokens, cls) in zip([pixels, pixels.flip(-1)] if len(into) > 1 else [pixels], into):
            feats = self.encoder(view, self.store.layers, autocast_dtype=self.settings.autocast)
            for k in self.store.layers:
                _put_rows(tokens[k], positions, feats["tokens"][k].to(self.dtype))
            _put_rows(cls, positions, feats["global"].to(self.dtype))


def extract_splits(cfg: Config, splits=SPLITS) -> None:
    """Render the dataset if needed and extract the splits in this process (no Prefect, no Dask): for tests and
    benchmarks."""
    synth.ensure(cfg.data)
    for store, _ in prepare_stores(cfg, splits).values():
        finish_store(cfg, store.url)  # under the chunks' claims; waits for chunks another run holds
        finalize_store(store.url, chunks=set(range(store.n_chunks)) - store.verified)
