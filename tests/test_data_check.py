"""Per-split data roots (the NYU BTS layout keeps training frames under sync/ and the official test frames under
official_splits/test/) and `spaceclip data check`: the tree read against its split files, each problem named with
its split-file line, before any extraction."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from flows.cli import main
from pipeline import datasets, synth
from pipeline.config import load_config
from pipeline.extract import encoder_for, extract_chunks, finalize_store, prepare_store
from pipeline.store import FeatureStore


def bts_nyu_tree(root: Path, train: int = 6, test: int = 3) -> dict:
    """A NYU Depth V2 tree in the BTS layout: <root>/sync/<scene>/{rgb,sync_depth}_N for training and
    <root>/official_splits/test/<scene>/... for the test lines (the synthetic frames, moved where BTS keeps them)."""
    sync, official = root / "sync", root / "official_splits" / "test"
    splits = root / "splits"
    paths = synth.synthesize_to("nyu", image_root=sync, depth_root=sync,
                                train_split=splits / "nyudepthv2_train_files_with_gt.txt",
                                test_split=splits / "nyudepthv2_test_files_with_gt.txt", train=train, test=test, seed=1)
    for line in paths["test_split"].read_text().splitlines():
        for rel in line.split()[:2]:
            (official / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(sync / rel, official / rel)
    return {"sync": sync, "official": official, **paths}


def write_config(tmp: Path, data: dict) -> Path:
    cfg = {
        "name": "nyu-bts", "data": {"layout": "nyu", "val_fraction": 0.2, **data},
        "encoder": {"name": "tiny-clip-64", "batch_size": 4},
        "views": {"mode": "full", "views_per_image": 1},
        "cache": {"root": str(tmp / "cache"), "chunk_size": 4, "layers": [0, 12]},
        "dask": {"processes": False},
    }
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("nyu")
    return root, bts_nyu_tree(root / "nyu_depth_v2")


def bts_data(t: dict, test_roots: bool = True) -> dict:
    data = {"image_root": str(t["sync"]), "depth_root": str(t["sync"]), "train_split": str(t["train_split"]),
            "test_split": str(t["test_split"])}
    if test_roots:
        data |= {"test_image_root": str(t["official"]), "test_depth_root": str(t["official"])}
    return data


def test_nyu_bts_layout_test_split_reads_and_extracts_from_the_test_roots(tree):
    root, t = tree
    cfg = load_config(write_config(root, bts_data(t)))
    test = datasets.read_split(cfg.data, "test")
    train = datasets.read_split(cfg.data, "train") + datasets.read_split(cfg.data, "val")
    assert len(test) == 3 and len(train) == 6
    assert all(s.image_path.parent.parent == t["official"] and s.image_path.is_file() for s in test)
    assert all(s.depth_path.parent.parent == t["official"] and s.depth_path.is_file() for s in test)
    assert all(s.image_path.parent.parent == t["sync"] and s.image_path.is_file() for s in train)
    assert datasets.check_dataset(cfg.data).ok

    # the test split extracts from official_splits/test/, and the stored features are those of that file
    synth.ensure(cfg.data)
    store, _ = prepare_store(cfg, "test")
    for chunk in store.pending_chunks():
        extract_chunks(cfg, store.url, [chunk])
    finalize_store(store.url)
    store = FeatureStore.open(store.url)
    rows = store.index()
    assert store.n == 3 and not rows["skipped"].any()
    assert [Path(p) for p in rows["image_path"]] == [s.image_path for s in test]
    encoder = encoder_for(cfg)
    image = np.array(Image.open(test[1].image_path).convert("RGB"))
    ref = encoder(encoder.preprocess(image), [0, 12])
    got = store.read([1])
    torch.testing.assert_close(got["global"].float(), ref["global"], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got["tokens"][12].float(), ref["tokens"][12], atol=2e-3, rtol=2e-3)

    # with one root for every split (what the README's NYU command used to say) the test frames are not found
    one_root = load_config(write_config(root / "one", bts_data(t, test_roots=False)))
    with pytest.raises(datasets.DatasetError, match=r"image file missing: .*sync/.*rgb_\d+\.jpg \(line 1 of "):
        datasets.load_image(datasets.read_split(one_root.data, "test")[0])


def test_data_check_names_each_missing_or_unreadable_file_with_its_line(tree, tmp_path, capsys):
    root, t = tree
    report = datasets.check_dataset(load_config(write_config(tmp_path, bts_data(t, test_roots=False))).data)
    train, test = report.splits
    assert train.ok and train.lines == 6 and train.images == {"present": 6, "missing": 0, "unreadable": 0}
    assert not report.ok and test.images == {"present": 0, "missing": 3, "unreadable": 0}
    assert test.depths["missing"] == 3 and [p.line for p in test.problems] == [1, 1, 2, 2, 3, 3]
    lines = t["test_split"].read_text().splitlines()
    assert [(p.kind, p.path, p.line) for p in test.problems[:2]] == [
        ("depth", t["sync"] / lines[0].split()[1], 1), ("image", t["sync"] / lines[0].split()[0], 1)]
    assert test.problems[1].describe() == f"image missing: {t['sync'] / lines[0].split()[0]} (line 1 of {t['test_split']})"

    # a copy of the tree with one image deleted and one depth map that is not 16-bit
    copy = tmp_path / "copy"
    shutil.copytree(t["sync"].parent, copy)
    sync = copy / "sync"
    train_lines = t["train_split"].read_text().splitlines()
    gone = sync / train_lines[3].split()[0].lstrip("/")
    gone.unlink()
    bad = sync / train_lines[4].split()[1].lstrip("/")
    Image.fromarray(np.zeros((480, 640, 3), np.uint8)).save(bad)
    data = {"image_root": str(sync), "depth_root": str(sync), "train_split": str(t["train_split"]),
            "test_split": str(t["test_split"]), "test_image_root": str(copy / "official_splits/test"),
            "test_depth_root": str(copy / "official_splits/test")}
    path = write_config(tmp_path, data)
    assert main(["data", "check", "--config", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"image missing: {gone} (line 4 of {t['train_split']})" in out
    assert f"depth unreadable: depth file is not a 16-bit PNG (mode RGB): {bad} (line 5 of {t['train_split']})" in out
    assert "images: 5 present, 1 missing, 0 unreadable" in out and "depth:  5 present, 0 missing, 1 unreadable" in out
    assert "test: " in out and "3 lines (0 with GT None)" in out
    # the header-only check finds the same two problems
    report = datasets.check_dataset(load_config(path).data, decode=False)
    assert [(p.kind, p.line, p.reason.split(":")[0]) for p in report.splits[0].problems] == [
        ("image", 4, "missing"), ("depth", 5, "unreadable")]

    # everything present: exit 0
    shutil.copy(t["sync"] / train_lines[3].split()[0].lstrip("/"), gone)
    shutil.copy(t["sync"] / train_lines[4].split()[1].lstrip("/"), bad)
    assert main(["data", "check", "--config", str(path)]) == 0
    assert capsys.readouterr().out.startswith("nyu dataset check: ok")


def test_data_check_reports_a_missing_split_file(tmp_path, capsys):
    data = {"image_root": str(tmp_path), "depth_root": str(tmp_path), "train_split": str(tmp_path / "no.txt"),
            "test_split": str(tmp_path / "none.txt")}
    assert main(["data", "check", "--config", str(write_config(tmp_path, data))]) == 1
    out = capsys.readouterr().out
    assert f"train: {tmp_path / 'no.txt'}: FAILED: split file missing (data.train_split)" in out
