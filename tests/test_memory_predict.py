"""benchmarks/memory_predict.py: the live-bytes tracker and the --quick run (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
CONFIGS = ("stock", "prefalign", "prefalign_packed")


@pytest.fixture()
def mp(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import memory_predict

    return memory_predict


def test_tracker_exact_on_toy_case(mp):
    check = mp.toy_check()
    assert check["exact"], check


def test_tracker_views_freed_and_baseline(mp):
    import torch

    base = torch.zeros(256)  # 1024 bytes, registered as the baseline
    known = [base, base[3:], base.view(16, 16)]  # views: one storage
    with mp.LiveBytes() as m:
        assert m.add_all(known) == 1024
        a = torch.empty(100, dtype=torch.bfloat16)  # 200
        views = [a[1:], a.view(10, 10), a[::2]]
        base.add_(1)  # in place on a baseline storage: nothing new
        assert m.current == 1224
        del a
        assert m.current == 1224  # the views keep the storage alive
        del views
        assert m.current == 1024
        b = torch.ones(10, dtype=torch.float64).sum()  # 80 then 8
        assert m.current == 1024 + 8  # the 80-byte ones() was freed
    assert m.peak == 1224
    del b


def test_linear_fit_and_longest(mp):
    fit = mp.linear_fit([1, 2, 4], [3.0, 5.0, 9.0])
    assert fit["a"] == pytest.approx(1.0) and fit["b"] == pytest.approx(2.0)
    assert fit["max_abs_residual"] < 1e-12
    pts = [(1024, 10.0), (2048, 20.0), (4096, 40.0)]
    assert mp.longest_under(pts, 30.0, 128) == (3072, "interpolated")
    assert mp.longest_under(pts, 50.0, 128) == (4096, "at_least")
    assert mp.longest_under(pts, 5.0, 128) == (None, "none_measured_fits")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory_predict") / "mp.json"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "AXOLOTL_DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(
        [sys.executable, str(BENCH / "memory_predict.py"), "--quick", "--out", out],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(REPO),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow  # the --quick run: about a minute on 2 busy cores
def test_quick_structure(quick):
    report, stdout = quick
    assert report["quick"] is True
    assert "PREDICTION" in report["label"] and "PREDICTION" in stdout
    assert report["tracker_toy_check"]["exact"]
    for key in (
        "machine",
        "settings",
        "measurements",
        "fake_vs_real_full_width",
        "small_model_validation",
        "prediction",
        "direct_fake_target_depth",
        "table",
        "cpu_s",
    ):
        assert key in report, key
    pred = report["prediction"]["configs"]
    assert set(pred) == set(CONFIGS)
    for name in CONFIGS:
        p = pred[name]
        assert p["predicted_peak_gib"] > 0
        fit = p["per_length"][str(p["seq"])]["fit"]
        assert {"a", "b", "max_abs_residual"} <= set(fit)
        assert fit["b"] > 0
    modes = {(m["config"], m["mode"]) for m in report["measurements"]}
    assert {(c, mode) for c in CONFIGS for mode in ("real", "fake")} <= modes


@pytest.mark.slow  # the --quick run: about a minute on 2 busy cores
def test_quick_fake_matches_real(quick):
    """The shape-only run counts what the computed one does (tiny shapes)."""
    report, _ = quick
    for entry in report["fake_vs_real_full_width"]["configs"].values():
        assert abs(entry["rel_diff"]) < 1e-6
    for entry in report["small_model_validation"]["configs"].values():
        assert all(abs(d) < 1e-6 for d in entry["fake_vs_real_rel_diff"].values())


@pytest.mark.slow  # the --quick run: about a minute on 2 busy cores
def test_quick_ours_below_stock(quick):
    report, _ = quick
    pred = report["prediction"]["configs"]
    stock = pred["stock"]["predicted_peak_gib"]
    assert pred["prefalign"]["predicted_peak_gib"] < stock
    assert pred["prefalign_packed"]["predicted_peak_gib"] < stock
