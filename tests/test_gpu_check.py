"""benchmarks/gpu_check.sh (the prepared GPU run) and gpu_wheels.sh, on the CPU.

The dry run is the GPU run's own code with tiny shapes on the local venv: every part,
the same JSON keys. Nothing here needs a GPU or the network.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
CONFIGS = ("stock", "prefalign", "prefalign_packed")
PARTS = {"setup", "fused_vs_plain", "dpo_step", "max_length", "cce"}


@pytest.fixture()
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_check

    return gpu_check


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    env.pop("GPU_CHECK_BUDGET_S", None)
    t0 = time.time()
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    path = out / "gpu_check.json"
    assert path.exists(), proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc, json.loads(path.read_text()), time.time() - t0, out


def test_dry_run_writes_every_part_and_exits_zero(dry_run):
    proc, report, wall, out = dry_run
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert report["dry_run"] is True and report["measured"] is False
    assert set(report["parts"]) == PARTS
    for name, part in report["parts"].items():
        assert part["status"] in ("ok", "skipped"), (name, part)
        assert part["seconds"] >= 0
    assert report["statuses"] == {k: v["status"] for k, v in report["parts"].items()}
    device = report["device"]
    assert device["name"] and device["torch"] and device["versions"]["torch"]
    assert report["wall_s"] < report["budget_s"] and wall < report["budget_s"] + 30
    assert "worker dpo" in (out / "gpu_check.log").read_text()
    assert "| prefalign_packed |" in report["table"] and "| stock |" in proc.stdout


def test_dry_run_fused_path_is_within_the_stated_tolerance(dry_run):
    _, report, _, _ = dry_run
    part = report["parts"]["fused_vs_plain"]
    tol = report["tolerance"]
    assert part["dtype"] == "bfloat16" and part["passed"], part["checks"]
    assert all(part["checks"].values())
    errors = part["errors"]
    assert errors["logps"]["vs_plain"]["max_abs"] <= tol["logps_max_abs_vs_plain"]
    for grad in ("grad_hidden", "grad_weight"):
        assert errors[grad]["vs_plain"]["rel_norm"] <= tol["grad_rel_norm_vs_plain"]
        limit = tol["vs_fp32_factor"] * errors[grad]["plain_vs_fp32"]["rel_norm"]
        assert errors[grad]["vs_fp32"]["rel_norm"] <= limit + tol["vs_fp32_slack"]
    # bf16 is not exact: the fp32 comparison must see a (small) difference.
    assert 0 < errors["logps"]["plain_vs_fp32"]["max_abs"] < 0.1
    assert part["time"]["impl"]["ms"] > 0 and part["time"]["plain"]["ms"] > 0
    assert part["shape"]["labelled"] < part["shape"]["tokens"]


def test_dry_run_dpo_step_has_ours_and_stock_rows(dry_run):
    _, report, _, _ = dry_run
    part = report["parts"]["dpo_step"]
    rows, settings = part["rows"], report["settings"]
    assert set(rows) == set(CONFIGS)
    for name, r in rows.items():
        assert r["status"] == "ok", (name, r)
        assert r["tokens_per_s"] > 0 and r["tokens_per_step"] == 2 * settings["seq"]
        assert r["peak_gib"] > 0 and r["model_tflops"] > 0
        assert len(r["step_times_s"]) == settings["warmup"] + settings["steps"]
        assert r["linears_nf4"] == 7 * settings["model"]["layers"]
        assert r["lora_params"] > 0 and r["speedup_vs_stock"] > 0
    assert rows["stock"]["impl"].startswith("trl ")
    assert rows["stock"]["impl"].endswith("DPOTrainer._compute_loss")
    assert rows["prefalign"]["impl"].endswith("PreferenceStep (padded)")
    assert rows["prefalign_packed"]["impl"].endswith("PreferenceStep (packing)")
    assert rows["prefalign_packed"]["packing"] and not rows["prefalign"]["packing"]
    assert part["n_params_flops"] > 0
    # Same model, data and seed, fp32: TRL's full-logits path and ours agree.
    for name in ("prefalign", "prefalign_packed"):
        assert part["agreement"][name]["logps_step0_max_rel_diff"] < 1e-5
        assert part["agreement"][name]["loss_max_abs_diff"] < 1e-4


def test_dry_run_length_search_stops_at_the_simulated_oom(dry_run):
    _, report, _, _ = dry_run
    rows = report["parts"]["max_length"]["rows"]
    limit = report["settings"]["fake_oom_above"]
    assert set(rows) == set(CONFIGS)
    for name in CONFIGS:
        search = rows[name]
        assert search["status"] == "ok", search
        statuses = [a["status"] for a in search["attempts"]]
        assert statuses == ["ok", "ok", "oom"], search
        assert search["max_seq_per_side"] == limit
        assert "simulated" in search["attempts"][-1]["error"]


def test_dry_run_cce_part_runs_its_harness(dry_run):
    _, report, _, _ = dry_run
    part = report["parts"]["cce"]
    if part["status"] == "skipped":  # no cut-cross-entropy: the stand-in ran
        assert "cut_cross_entropy" in part["reason"]
        standin = part["standin"]
        assert standin["passed"]
        assert standin["errors"]["grad_hidden"]["vs_fused"]["rel_norm"] < 2e-2
        assert set(standin["time"]) == {"impl", "plain", "fused"}
    else:
        assert part["status"] == "ok"


def _tiny_qlora(bench):
    """The dry run's model, AdamW and accelerator, in this process."""
    import torch
    from accelerate import Accelerator

    spec = {**bench.SETTINGS["dry"], "dry_run": True}
    accelerator = Accelerator(mixed_precision="no", cpu=True)
    model, params, optimizer, _ = bench._prepare(torch, spec, accelerator)
    return spec, model, params, optimizer, accelerator


def _plain_logps(model, batch):
    """Summed completion log-probs from the full logits, fp32: the plain reference."""
    import torch

    logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
    picked = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None])[
        ..., 0
    ]
    return (picked * batch["completion_mask"][:, 1:]).sum(-1)


def test_stock_arm_runs_trls_own_compute_loss(bench, monkeypatch):
    """The stock loss is TRL's DPOTrainer._compute_loss itself, on every step."""
    pytest.importorskip("trl")
    import torch
    from trl.trainer.dpo_trainer import DPOTrainer

    calls = []
    upstream = DPOTrainer._compute_loss

    def spy(self, model, inputs, return_outputs):
        calls.append(inputs["input_ids"].shape)
        return upstream(self, model, inputs, return_outputs)

    monkeypatch.setattr(DPOTrainer, "_compute_loss", spy)
    args, reason = bench.trl_args(cuda=False, gc_kwargs={"use_reentrant": False})
    assert args is not None, reason
    spec, model, params, optimizer, accelerator = _tiny_qlora(bench)
    trl_fn, about = bench.stock_loss(model, accelerator, args)
    assert about["impl"].startswith("trl ") and "_compute_loss" in about["impl"]
    vocab = spec["model"]["vocab"]
    first = bench.pair_batch(torch, 32, vocab, "cpu", 0)
    loss0, _, _ = trl_fn(first)  # LoRA B = 0: policy = reference
    assert loss0.item() == pytest.approx(0.6931471805599453, abs=1e-6)
    bench._train_step(torch, trl_fn, first, params, optimizer, False, False, False)
    batch = bench.pair_batch(torch, 32, vocab, "cpu", 1)
    loss, chosen, rejected = trl_fn(batch)
    assert calls == [(2, 32)] * 3
    assert loss.item() != pytest.approx(0.6931471805599453, abs=1e-6)
    with torch.no_grad():
        plain = _plain_logps(model, batch)
    torch.testing.assert_close(chosen.sum(), plain[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(rejected.sum(), plain[1], rtol=1e-5, atol=1e-4)


def test_stock_arm_without_trl_is_skipped_with_the_reason(bench, monkeypatch, capsys):
    """No copy of TRL's loss stands in: the stock rows say skipped, and why."""
    import torch

    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError
    args, reason = bench.trl_args(cuda=False, gc_kwargs={"use_reentrant": False})
    assert args is None and "import of trl halted" in reason
    spec = {**bench.SETTINGS["dry"], "_trl": (args, reason)}
    bench.dpo_config(torch, None, "stock", spec, 0.0)
    records = [
        json.loads(line[len("RECORD ") :])
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("RECORD ")
    ]
    assert [(r["kind"], r["status"]) for r in records] == [
        ("dpo_step", "skipped"),
        ("max_length", "skipped"),
    ]
    for record in records:
        assert record["reason"].startswith("TRL's DPOTrainer cannot be imported: ")
        assert "import of trl halted" in record["reason"]


def test_a_hanging_worker_is_killed_and_what_it_said_is_kept(bench, tmp_path):
    args = bench.parse_args(["--out", str(tmp_path), "--dry-run", "--budget-s", "60"])
    driver = bench.Driver(args)
    t0 = time.time()
    run = driver.worker("sleep", {"seconds": 120}, timeout=3)
    assert run["status"] == "timeout" and time.time() - t0 < 20
    assert [r["kind"] for r in run["records"]] == ["sleep"]


def test_a_failing_part_is_recorded_and_the_json_written(bench, tmp_path):
    args = bench.parse_args(["--out", str(tmp_path), "--dry-run"])
    driver = bench.Driver(args)
    driver.part("cce", lambda: 1 / 0)
    driver.part("setup", lambda: {"status": "skipped"})
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["parts"]["cce"]["status"] == "error"
    assert "ZeroDivisionError" in saved["parts"]["cce"]["error"]
    assert saved["parts"]["setup"]["status"] == "skipped"


def test_dpo_time_boxes_leave_part_4_its_time_even_if_every_worker_hangs(
    bench, tmp_path, monkeypatch
):
    """The GPU schedule: each worker's time box, used up to the last second, still
    leaves the reserve for part 4, and nothing starts once the budget is spent."""
    args = bench.parse_args(["--out", str(tmp_path), "--budget-s", "440"])
    driver = bench.Driver(args)
    budget = driver.settings["budget"]
    reserve = budget["cce"] + 10
    driver.deadline = time.time() + 440 - 40  # setup and part 1 took 40 s
    boxes = []

    def hanging_worker(name, spec, timeout):
        boxes.append((timeout, spec["search_budget_s"]))
        driver.deadline -= timeout  # it ran until it was killed
        return {"status": "timeout", "records": [], "stderr_tail": "killed"}

    monkeypatch.setattr(driver, "worker", hanging_worker)
    driver.dpo()
    assert len(boxes) == len(CONFIGS)
    assert driver.left() >= reserve - 1
    for timeout, search in boxes:
        assert timeout > budget["dpo_main"] - 1 and 0 <= search <= budget["search_max"]
    rows = driver.report["parts"]["dpo_step"]["rows"]
    assert {r["status"] for r in rows.values()} == {"timeout"}
    assert driver.report["parts"]["max_length"]["rows"]["stock"]["status"] == "not_run"

    spent = bench.Driver(args)
    spent.deadline = time.time() + 4  # 3 s are kept for the JSON
    assert spent.worker("sleep", {"seconds": 1}, timeout=60)["status"] == "not_run"


def _wheel_script(dest: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(BENCH / "gpu_wheels.sh"), str(dest)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "GPU_WHEELS_NO_DOWNLOAD": "1", **env},
        timeout=60,
    )


def _fake_wheels(dest: Path, mib: list[float]) -> None:
    dest.mkdir()
    for i, size in enumerate(mib):
        with (dest / f"pkg{i}-1.0-py3-none-any.whl").open("wb") as fh:
            fh.truncate(int(size * 2**20))  # sparse: the size is what counts


def test_wheel_size_guard_fails_over_the_limit(tmp_path):
    _fake_wheels(tmp_path / "w", [0.75, 0.75])
    over = _wheel_script(
        tmp_path / "w", GPU_WHEELS_LIMIT_MIB="1", GPU_WHEELS_TREE_CHECK="0"
    )
    assert over.returncode == 2, over.stdout + over.stderr
    assert "exceed 1 MiB" in over.stderr and "1.50 MiB  total" in over.stdout
    under = _wheel_script(
        tmp_path / "w", GPU_WHEELS_LIMIT_MIB="2", GPU_WHEELS_TREE_CHECK="0"
    )
    assert under.returncode == 0, under.stdout + under.stderr
    assert "pkg0-1.0-py3-none-any.whl" in under.stdout


def test_wheel_size_guard_counts_the_working_tree_that_travels(tmp_path):
    _fake_wheels(tmp_path / "w", [63.9])  # under 64 alone, not with the tree
    proc = _wheel_script(tmp_path / "w")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "working tree" in proc.stderr


def test_wheel_script_needs_a_destination():
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_wheels.sh")], capture_output=True, text=True
    )
    assert proc.returncode == 1 and "usage" in proc.stderr


def test_the_wheel_list_covers_what_the_gpu_run_imports(bench):
    text = (BENCH / "gpu_wheels.sh").read_text()
    block = text[text.index("WHEELS=(") : text.index("\n)\n")]
    pins = dict(re.findall(r"^\s+([A-Za-z0-9_.-]+)==(\S+)", block, re.M))
    names = {n.replace("-", "_") for n in pins}
    assert set(bench.NEEDED_MODULES) <= names
    assert pins["bitsandbytes"] and pins["trl"] == "1.9.0"
    assert all(re.fullmatch(r"[0-9][0-9.]*", v) for v in pins.values()), pins
