"""bench/gpu_check.py rehearsed on the CPU at a tiny size: every check runs and its JSON says what the GPU run will
report. On the CPU, each device-vs-CPU comparison compares the CPU with itself, and the training guarantees hold
bit for bit, so the values are exact."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ["extraction", "loader", "syncs", "shared_pass", "resume", "two_passes", "evaluate", "predict", "importer"]


@pytest.mark.slow
def test_gpu_check_runs_every_check_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--frames", "16", "--encoder",
         "tiny-clip-64", "--batches", "2", "4", "--json", str(out), "--keep", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    report = json.loads(proc.stdout)
    assert report == json.loads(out.read_text()) and len(proc.stdout.splitlines()) == 1
    assert proc.returncode == 0, (report.get("failed"), proc.stderr[-3000:])
    assert list(report["checks"]) == CHECKS and report["failed"] == [] and report["ok"] is True
    assert (report["device"], report["frames"], report["gpu"]) == ("cpu", 16, None)
    c = report["checks"]
    ext = c["extraction"]
    assert set(ext) >= {"cpu_fp32_images_per_s", "cpu-float32-b2", "cpu-float32-b4", "cpu-bfloat16-b2",
                        "cpu-bfloat16-b4"}
    assert ext["cpu-float32-b2"]["max_token_diff"] == 0.0  # the reference's own settings: the same bytes
    assert ext["cpu-float32-b4"]["max_token_diff"] < 1e-2  # another batch size: float rounding at most
    assert 0 < ext["cpu-bfloat16-b2"]["max_token_diff"] < 0.5 * max(1.0, ext["cpu-bfloat16-b2"]["per_array"][
        "ref_max_abs"])  # bf16 autocast really ran
    assert all(ext[k]["images_per_s"] > 0 for k in ext if k.startswith("cpu-"))
    assert c["loader"]["stream"] == {"mode": "stream", "equal": True}
    assert c["loader"]["resident"] == {"mode": "cpu", "equal": True}
    assert c["loader"]["batches"] > 2
    assert c["syncs"]["skipped"] and all(c["syncs"][v]["syncs"] is None and c["syncs"][v]["loss"] > 0
                                         for v in ("baseline", "full"))
    assert c["shared_pass"]["identical"] is True
    assert all(c[k][v] == {"identical": True, "max_weight_diff": 0.0} for k in ("shared_pass",)
               for v in ("baseline", "full"))
    assert (c["resume"]["identical"], c["resume"]["epochs"]) == (True, 2)
    assert all(c["two_passes"][v]["identical"] for v in ("baseline", "full"))
    assert c["evaluate"]["d_abs_rel"] == 0.0 and 0 < c["evaluate"]["abs_rel"] < 10
    assert c["predict"]["images"] == c["predict"]["depth_maps_compared"] == 4
    assert c["predict"]["max_rel_depth_diff"] == 0.0
    assert c["importer"] == {**c["importer"], "ok": True, "variant": "full", "encoder_checked": True,
                             "max_depth_diff": 0.0}
