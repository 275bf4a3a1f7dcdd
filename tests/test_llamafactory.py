"""`prefalign llamafactory train`: config checks here, LLaMA-Factory runs in its own
environment (tests/llamafactory_env.sh) as subprocesses."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from conftest import REPO, llamafactory_python

from axolotl_prefalign.core.config import PrefAlignConfig, PrefAlignConfigError
from axolotl_prefalign.core.rows import BadRowError
from axolotl_prefalign.integrations.llamafactory import launcher
from axolotl_prefalign.integrations.llamafactory.launcher import (
    MODULE,
    LaunchError,
    check_trained,
    check_version,
    precheck,
    processes,
    read_config,
    resolve,
    torchrun_command,
)

LF_EXAMPLES = REPO / "yaml_examples" / "llamafactory"
PROMPTS = REPO / "axolotl_prefalign" / "data" / "spa_prompts_example.jsonl"
PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris", "rejected": "Rome"},
    {"prompt": "How many legs has a spider?", "chosen": "Eight", "rejected": "Six"},
    {"prompt": "Is fire hot?", "chosen": "Yes, it is hot.", "rejected": "No."},
    {"prompt": "Say hello.", "chosen": "hello world", "rejected": "good bye"},
]


def _dpo(**overrides):
    return {"stage": "dpo", "do_train": True, **overrides}


# -- configuration --------------------------------------------------------------


def test_read_config_takes_the_prefalign_block_out(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump({**_dpo(pref_beta=0.2), "prefalign": {"loss": "robust"}})
    )
    args, pa = read_config(path)
    assert "prefalign" not in args and args["pref_beta"] == 0.2
    assert pa.loss == "robust"


def test_a_typo_in_the_block_is_an_error_naming_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**_dpo(), "prefalign": {"los": "spa"}}))
    with pytest.raises(PrefAlignConfigError, match="unknown key 'prefalign.los'"):
        read_config(path)


@pytest.mark.parametrize(
    "pref_loss, block, expected",
    [
        (None, {}, "sigmoid"),
        ("hinge", {}, "hinge"),
        ("ipo", {}, "ipo"),
        ("sigmoid", {"loss": "spa"}, "spa"),
        (None, {"loss": "cdpo", "label_smoothing": 0.1}, "cdpo"),
    ],
)
def test_the_loss_is_the_blocks_or_llamafactorys_pref_loss(pref_loss, block, expected):
    args = _dpo() if pref_loss is None else _dpo(pref_loss=pref_loss)
    assert resolve(args, PrefAlignConfig.from_raw(block)).loss == expected


def test_spa_takes_its_beta_unless_pref_beta_is_set():
    args = _dpo()
    resolve(args, PrefAlignConfig.from_raw({"loss": "spa", "spa": {"beta": 0.05}}))
    assert args["pref_beta"] == 0.05
    args = _dpo(pref_beta=0.3)
    resolve(args, PrefAlignConfig.from_raw({"loss": "spa"}))
    assert args["pref_beta"] == 0.3


@pytest.mark.parametrize(
    "args, block, message",
    [
        (_dpo(pref_loss="orpo"), {}, "pref_loss: orpo is not one of prefalign's"),
        (_dpo(pref_loss="hinge"), {"loss": "ipo"}, "pref_loss: hinge and prefalign"),
        (_dpo(pref_ftx=0.5), {}, "pref_ftx → use nothing: the SFT term"),
        (_dpo(dpo_label_smoothing=0.1), {}, "prefalign.loss: cdpo"),
        (_dpo(ld_alpha=0.5), {}, "ld_alpha → use nothing"),
        (_dpo(), {"loss": "soft"}, "soft needs each pair's judge_prob"),
        (_dpo(), {"reference_cache": True}, "reference_cache"),
        ({"stage": "ppo"}, {}, "runs stage dpo or sft, got 'ppo'"),
        ({"stage": "sft"}, {"loss": "spa"}, "need stage: dpo"),
        (
            {"stage": "sft"},
            {"contrast": {"unlikelihood_weight": 0.5}},
            "unlikelihood_weight needs the Axolotl plugin",
        ),
    ],
)
def test_settings_our_trainer_would_bypass_are_errors(args, block, message):
    with pytest.raises(PrefAlignConfigError, match=message):
        resolve(dict(args), PrefAlignConfig.from_raw(block))


def test_a_missing_or_untested_llamafactory_is_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "llamafactory", None)
    with pytest.raises(LaunchError, match="LLaMA-Factory is not installed"):
        check_version()
    monkeypatch.setitem(
        sys.modules, "llamafactory", types.SimpleNamespace(__version__="0.9.9")
    )
    with pytest.raises(LaunchError, match=r"0\.9\.9 is not a release .* \(0\.9\.5\)"):
        check_version()
    monkeypatch.setenv("PREFALIGN_LLAMAFACTORY_UNTESTED", "1")
    assert check_version() == "0.9.9"


def test_more_than_one_process_relaunches_this_launcher_under_torchrun(monkeypatch):
    monkeypatch.delenv("FORCE_TORCHRUN", raising=False)
    assert processes() == 1  # no GPU here
    monkeypatch.setenv("FORCE_TORCHRUN", "1")
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    monkeypatch.setenv("MASTER_PORT", "29555")
    assert processes() == 2
    cmd = torchrun_command("cfg.yaml", 2)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2"
    assert cmd[cmd.index("--master_port") + 1] == "29555"
    assert cmd[-3:] == ["-m", MODULE, "cfg.yaml"]


def _dataset_dir(tmp_path: Path, rows: list, name: str = "pairs") -> Path:
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = {
        name: {
            "file_name": f"{name}.jsonl",
            "formatting": "prefalign_pairs",
            "ranking": True,
        }
    }
    (d / "dataset_info.json").write_text(json.dumps(info))
    return d


def test_precheck_names_file_line_and_field_of_a_bad_pair(tmp_path):
    rows = [PAIRS[0], {"prompt": "x", "chosen": "same", "rejected": 3}, PAIRS[1]]
    d = _dataset_dir(tmp_path, rows)
    args = _dpo(dataset="pairs", dataset_dir=str(d))
    with pytest.raises(BadRowError, match=r"pairs\.jsonl, line 2, field 'rejected'"):
        precheck(args, PrefAlignConfig())


def test_precheck_skip_points_llamafactory_at_a_checked_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("AXOLOTL_PREFALIGN_CACHE", str(tmp_path / "cache"))
    rows = [PAIRS[0], {"prompt": "x", "chosen": "same", "rejected": "same"}, PAIRS[1]]
    d = _dataset_dir(tmp_path, rows)
    args = _dpo(dataset="pairs", dataset_dir=str(d))
    precheck(args, PrefAlignConfig(on_bad_row="skip"))
    new_dir = Path(args["dataset_dir"])
    assert new_dir != d and new_dir.is_relative_to(tmp_path / "cache")
    entry = json.loads((new_dir / "dataset_info.json").read_text())["pairs"]
    kept = [json.loads(x) for x in Path(entry["file_name"]).read_text().splitlines()]
    assert [r["prompt"] for r in kept] == [PAIRS[0]["prompt"], PAIRS[1]["prompt"]]
    # The user's own files are untouched.
    assert len((d / "pairs.jsonl").read_text().splitlines()) == 3


def test_precheck_leaves_clean_data_where_it_is(tmp_path):
    d = _dataset_dir(tmp_path, PAIRS)
    args = _dpo(dataset="pairs", dataset_dir=str(d))
    precheck(args, PrefAlignConfig())
    assert args["dataset_dir"] == str(d)


# -- LLaMA-Factory runs ---------------------------------------------------------


def lf_config(tmp_path, model_dir, **overrides) -> Path:
    """A two-step LoRA DPO config over PAIRS (our pair rows, our converter)."""
    data = _dataset_dir(tmp_path, PAIRS)
    config = {
        "model_name_or_path": str(model_dir),
        "stage": "dpo",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": 4,
        "lora_target": "all",
        "pref_beta": 0.5,
        "dataset": "pairs",
        "dataset_dir": str(data),
        "template": "default",
        "cutoff_len": 64,
        "overwrite_cache": True,
        "output_dir": str(tmp_path / "out"),
        "overwrite_output_dir": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "per_device_train_batch_size": 2,
        "max_steps": 2,
        "learning_rate": 0.05,
        "lr_scheduler_type": "constant",
        "disable_shuffling": True,
        "use_cpu": True,
        "seed": 0,
        **overrides,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_lf(python: str, *args, cwd: Path, timeout: int = 600):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(cwd / "hf-datasets"),
        "AXOLOTL_PREFALIGN_CACHE": str(cwd / "cache"),
        "CUDA_VISIBLE_DEVICES": "",
    }
    return subprocess.run(
        [python, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _compare(tmp_path, model_dir, **overrides) -> list[dict]:
    python = llamafactory_python()
    config = lf_config(tmp_path, model_dir, **overrides)
    check = REPO / "tests" / "llamafactory_check.py"
    proc = run_lf(python, check, "compare", config, "rec.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "trainer Recording" in proc.stdout
    records = json.loads((tmp_path / "rec.json").read_text())
    assert [r["step"] for r in records] == [0, 1]
    return records


def _h(r) -> list[float]:
    pc, pr = r["policy_chosen"], r["policy_rejected"]
    rc, rr = r["ref_chosen"], r["ref_rejected"]
    return [(a - c) - (b - d) for a, b, c, d in zip(pc, pr, rc, rr, strict=True)]


def _sigmoid_loss(h: list[float], beta: float) -> float:
    return sum(math.log1p(math.exp(-beta * x)) for x in h) / len(h)


@pytest.mark.slow
@pytest.mark.llamafactory_env
def test_two_step_llamafactory_dpo_loss_equals_llamafactorys_sigmoid(
    tmp_path, tiny_model_dir
):
    """Through the launcher, on LLaMA-Factory's own batches and weights: our fused
    sigmoid loss and reward metrics are LLaMA-Factory's, step for step."""
    records = _compare(tmp_path, tiny_model_dir, pref_loss="sigmoid")
    for r in records:
        assert r["loss"] == pytest.approx(r["lf_loss"], rel=1e-5, abs=1e-6)
        for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert r["metrics"][name] == pytest.approx(
                r["lf_metrics"][name], rel=1e-4, abs=1e-5
            ), name
        assert r["metrics"]["logps/chosen"] == pytest.approx(
            r["lf_metrics"]["logps/chosen"], rel=1e-5
        )
    # The first step moved the adapter: the second step's margins are not zero.
    assert max(abs(x) for x in _h(records[1])) > 1e-3
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    steps = [h for h in state["log_history"] if "loss" in h]
    assert len(steps) == 2
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.llamafactory_env
def test_our_hinge_and_ipo_are_their_formulas_where_llamafactorys_are_sigmoid(
    tmp_path, tiny_model_dir
):
    for loss in ("hinge", "ipo"):
        d = tmp_path / loss
        d.mkdir()
        records = _compare(d, tiny_model_dir, pref_loss=loss)
        r = records[1]  # after one update: non-zero margins
        beta, h = r["beta"], _h(r)
        assert max(abs(x) for x in h) > 1e-3
        if loss == "hinge":  # SLiC: relu(1 − β·h) on summed log-ratios
            expected = sum(max(0.0, 1 - beta * x) for x in h) / len(h)
        else:  # IPO: (h̄ − 1/(2β))² on per-token averaged log-ratios (LF's logps
            # are already averaged for loss_type ipo)
            expected = sum((x - 1 / (2 * beta)) ** 2 for x in h) / len(h)
        assert r["loss"] == pytest.approx(expected, rel=1e-4)
        # LLaMA-Factory 0.9.5 on trl 0.24 computes the sigmoid loss instead.
        assert r["lf_loss"] == pytest.approx(_sigmoid_loss(h, beta), rel=1e-4)
        assert r["lf_loss"] != pytest.approx(r["loss"], rel=1e-2)


def _trainer(built: int, batches: int, ended_at=None) -> type:
    return type(
        "PrefAlignLFTrainer",
        (),
        {"built": built, "batches_seen": batches, "ended_at": ended_at},
    )


def test_nothing_left_to_train_is_told_apart_from_our_trainer_missing(caplog):
    """A finished run resumed at its last step trained no batch and is fine; a
    run our trainer never reached is an error."""
    check_trained(_trainer(1, 3, (3, 3, None)))
    ours = logging.getLogger("axolotl_prefalign")  # may not propagate (CLI)
    ours.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO", logger="axolotl_prefalign"):
            check_trained(_trainer(1, 0, (8, 8, "out/checkpoint-8")))
    finally:
        ours.removeHandler(caplog.handler)
    assert (
        "nothing left to train: resumed at step 8 of 8 from out/checkpoint-8"
        in caplog.text
    )
    with pytest.raises(LaunchError, match="PrefAlignLFTrainer was never built"):
        check_trained(_trainer(0, 0))
    with pytest.raises(LaunchError, match="was built but computed no batch"):
        check_trained(_trainer(1, 0, (0, 8, None)))


@pytest.mark.slow
@pytest.mark.llamafactory_env
def test_a_run_our_trainer_did_not_train_fails_loudly(tmp_path, tiny_model_dir):
    python = llamafactory_python()
    config = lf_config(tmp_path, tiny_model_dir, max_steps=1)
    check = REPO / "tests" / "llamafactory_check.py"
    proc = run_lf(python, check, "not-ours", config, cwd=tmp_path)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "LaunchError: LLaMA-Factory trained without prefalign's trainer" in (
        proc.stdout
    )


@pytest.mark.slow
@pytest.mark.llamafactory_env
def test_cli_trains_spa_loss_with_llamafactory(tmp_path, tiny_model_dir):
    """`prefalign llamafactory train` as a user runs it: SPA's self-refined loss
    with DND, its metrics in LLaMA-Factory's log."""
    python = llamafactory_python()
    config = lf_config(tmp_path, tiny_model_dir)
    raw = yaml.safe_load(config.read_text())
    raw["prefalign"] = {"loss": "spa", "spa": {"iteration": 1}}
    config.write_text(yaml.safe_dump(raw))
    cli = Path(python).parent / "prefalign"
    proc = run_lf(str(cli), "llamafactory", "train", config, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "trainer PrefAlignLFTrainer, loss spa" in proc.stdout
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    steps = [h for h in state["log_history"] if "loss" in h]
    assert len(steps) == 2
    for h in steps:
        assert 0.0 <= h["spa/noisy_fraction"] <= 1.0
        assert math.isfinite(h["spa/threshold"]) and "spa/dnd_margin" in h


@pytest.mark.slow
@pytest.mark.llamafactory_env
def test_cli_bad_pair_row_is_one_line_naming_file_and_line(tmp_path, tiny_model_dir):
    python = llamafactory_python()
    config = lf_config(tmp_path, tiny_model_dir)
    bad = tmp_path / "data" / "pairs.jsonl"
    bad.write_text(bad.read_text() + '{"prompt": "q", "chosen": "", "rejected": "r"}\n')
    cli = Path(python).parent / "prefalign"
    proc = run_lf(str(cli), "llamafactory", "train", config, cwd=tmp_path)
    assert proc.returncode == 1
    assert "pairs.jsonl, line 5, field 'chosen': empty" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_launcher_module_runs_as_a_script_with_usage(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", MODULE], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "usage:" in proc.stderr
    assert launcher.MODULE == MODULE


# -- the SPA loop with LLaMA-Factory -----------------------------------------------


def _lf_example(name: str, tmp_path: Path, model_dir: Path, **overrides) -> Path:
    """A sample from yaml_examples/llamafactory/ on the tiny model, a few steps."""
    c = yaml.safe_load((LF_EXAMPLES / name).read_text())
    if c.get("template") == "smollm2":  # SmolLM2's; the tiny model's is plain
        c.pop("default_system", None)
        c["template"] = "default"
    c.update(
        model_name_or_path=str(model_dir),
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        logging_steps=1,  # the samples log every 1 or 5 steps; two steps here
        learning_rate=0.05,
        cutoff_len=128,
        use_cpu=True,
    )
    if c.get("dataset_dir", "").startswith("yaml_examples"):
        c["dataset_dir"] = str(REPO / c["dataset_dir"])
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(c.get(key), dict):
            c[key] = {**c[key], **value}
        else:
            c[key] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(c))
    return path


def test_spa_stage_configs_are_llamafactory_dpo_runs_of_our_trainer(tmp_path):
    from axolotl_prefalign.integrations.llamafactory.spa_loop import (
        LlamaFactoryTrainings,
    )
    from axolotl_prefalign.spa.loop import iter_dir

    args = yaml.safe_load((LF_EXAMPLES / "spa_loop.yaml").read_text())
    block = args.pop("prefalign")
    pa = PrefAlignConfig.from_raw(block)
    t = LlamaFactoryTrainings(args, block, pa.spa, tmp_path / "c.yaml", "base", True)
    out = tmp_path / "out"
    shard = tmp_path / "shard.jsonl"
    shard.write_text(json.dumps(PAIRS[0]) + "\n")
    seed_cfg, _ = t.write_train_config(0, "base", iter_dir(out, 0), None)
    seed = yaml.safe_load(seed_cfg.read_text())
    assert seed["prefalign"]["loss"] == "sigmoid"
    assert seed["num_train_epochs"] == 3.0 and seed["dataset"] == "prefalign_spa_seed"
    it_cfg, _ = t.write_train_config(1, "prev/merged", iter_dir(out, 1), [str(shard)])
    it = yaml.safe_load(it_cfg.read_text())
    assert it["model_name_or_path"] == "prev/merged" and it["stage"] == "dpo"
    assert it["prefalign"]["loss"] == "spa"
    assert it["prefalign"]["spa"]["iteration"] == 1
    # The loop's own settings stay out of the trainer's block.
    assert "prompts" not in it["prefalign"]["spa"]
    info = json.loads((Path(it["dataset_dir"]) / "dataset_info.json").read_text())
    assert info == {
        "prefalign_spa_iter1": {
            "file_name": "pairs.jsonl",
            "formatting": "prefalign_pairs",
            "ranking": True,
        }
    }
    assert t.train_command(it_cfg)[1:] == ["-m", launcher.MODULE, str(it_cfg)]
    merge = t.merge_command(it_cfg)
    assert merge[-2] == "export"
    spec = yaml.safe_load(Path(merge[-1]).read_text())
    assert spec["adapter_name_or_path"] == str(iter_dir(out, 1))
    assert spec["export_dir"] == str(iter_dir(out, 1) / "merged")


def test_spa_loop_needs_a_dpo_config_with_spa(tmp_path):
    from axolotl_prefalign.integrations.llamafactory.spa_loop import run

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"stage": "sft", "prefalign": {"loss": "spa"}}))
    with pytest.raises(PrefAlignConfigError, match="trains with stage: dpo"):
        run(path)


@pytest.mark.slow
@pytest.mark.llamafactory_env
def test_spa_loop_through_llamafactory_end_to_end_and_resumes(tmp_path, tiny_model_dir):
    """The sample SPA loop on the tiny model: seed DPO, merge, expansion with our
    judge, an SPA iteration through our LLaMA-Factory trainer, merge; a rerun
    skips every finished stage."""
    python = llamafactory_python()
    config = _lf_example(
        "spa_loop.yaml",
        tmp_path,
        tiny_model_dir,
        prefalign={
            "loss": "spa",
            "spa": {
                "iterations": 1,
                "prompts_per_iteration": [4],
                "max_new_tokens": 8,
                "prompts": [
                    {
                        "path": str(
                            REPO / "axolotl_prefalign/data/spa_prompts_example.jsonl"
                        )
                    }
                ],
            },
        },
    )
    cli = Path(python).parent / "prefalign"
    proc = run_lf(str(cli), "llamafactory", "spa", config, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    summary = json.loads((out / "spa_summary.json").read_text())
    assert summary["final_model"] == str(out / "iter_1" / "merged")
    assert (out / "iter_1" / "merged" / "model.safetensors").exists()
    it1 = summary["iterations"][1]
    assert it1["expansion"]["pairs"] + it1["expansion"]["ties_dropped"] == 4
    assert it1["training"]["logged_steps"] == 2
    assert "mean_spa/noisy_fraction" in it1["training"]
    assert (
        "trainer PrefAlignLFTrainer, loss spa"
        in (out / "iter_1" / "train.log").read_text()
    )
    assert "loss sigmoid" in (out / "iter_0" / "train.log").read_text()
    again = run_lf(str(cli), "llamafactory", "spa", config, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    for stage in ("iter_0/train", "iter_0/merge", "iter_1/expand", "iter_1/train"):
        assert f"SPA: {stage} already done, skipped" in log


@pytest.mark.slow
@pytest.mark.llamafactory_env
def test_dpo_sample_trains_with_our_trainer(tmp_path, tiny_model_dir):
    python = llamafactory_python()
    config = _lf_example("dpo_prefalign.yaml", tmp_path, tiny_model_dir)
    cli = Path(python).parent / "prefalign"
    proc = run_lf(str(cli), "llamafactory", "train", config, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "trainer PrefAlignLFTrainer, loss robust" in proc.stdout
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert len([h for h in state["log_history"] if "loss" in h]) == 2


@pytest.mark.slow
@pytest.mark.llamafactory_env
def test_export_samples_train_through_the_launcher(tmp_path, tiny_model_dir):
    """contrast_sft / spa_dpo / robustft_sft on what `axolotl prefalign export`
    wrote: each trains two steps in LLaMA-Factory (SFT passes through, DPO is ours)."""
    from test_export_llamafactory import contrast_config, robustft_config, spa_config

    from axolotl_prefalign.cli import load_config
    from axolotl_prefalign.integrations.llamafactory.export import export_from_config

    python = llamafactory_python()
    exported = tmp_path / "lf"
    for make in (contrast_config, spa_config, robustft_config):
        export_from_config(
            load_config(make(tmp_path, tiny_model_dir)), exported, echo=lambda s: None
        )
    cli = Path(python).parent / "prefalign"
    for name, stage in (
        ("contrast_sft.yaml", "sft"),
        ("spa_dpo.yaml", "dpo"),
        ("robustft_sft.yaml", "sft"),
    ):
        d = tmp_path / name.split(".")[0]
        d.mkdir()
        config = _lf_example(name, d, tiny_model_dir, dataset_dir=str(exported))
        proc = run_lf(str(cli), "llamafactory", "train", config, cwd=d)
        assert proc.returncode == 0, name + proc.stdout[-2000:] + proc.stderr[-3000:]
        assert f"stage {stage}" in proc.stdout
        state = json.loads((d / "out" / "trainer_state.json").read_text())
        assert len([h for h in state["log_history"] if "loss" in h]) == 2, name


def _denoise_sample(tmp_path: Path, model_dir: Path) -> tuple[Path, Path]:
    """The denoise sample on a copy of its data folder (it writes into it)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(LF_EXAMPLES / "data", data)
    info = json.loads((data / "dataset_info.json").read_text())
    seed = info["prefalign_spa_seed"]
    seed["file_name"] = str((LF_EXAMPLES / "data" / seed["file_name"]).resolve())
    (data / "dataset_info.json").write_text(json.dumps(info))
    config = _lf_example(
        "robustft_denoise.yaml", tmp_path, model_dir, dataset_dir=str(data)
    )
    return config, data


@pytest.mark.slow
@pytest.mark.llamafactory_env
def test_denoise_sample_writes_a_dataset_llamafactory_then_trains(
    tmp_path, smollm2_dir
):
    """`prefalign llamafactory denoise` on the sample (SmolLM2 as the expert, the
    bundled sentence encoder), then SFT on `noisy_sums_robustft` in LLaMA-Factory."""
    python = llamafactory_python()
    config, data = _denoise_sample(tmp_path, smollm2_dir)
    raw = yaml.safe_load(config.read_text())
    raw["template"] = "smollm2"  # the real model's own template
    raw["default_system"] = (
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    )
    config.write_text(yaml.safe_dump(raw))
    cli = Path(python).parent / "prefalign"
    proc = run_lf(str(cli), "llamafactory", "denoise", config, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "train it with `dataset: noisy_sums_robustft`" in proc.stdout
    assert proc.stdout.count("RobustFT: ") == 1  # the report, once
    entries = json.loads((data / "dataset_info.json").read_text())
    assert {"noisy_sums", "noisy_sums_robustft", "prefalign_spa_seed"} <= set(entries)
    rows = [
        json.loads(x)
        for x in (data / "noisy_sums_robustft.jsonl").read_text().splitlines()
    ]
    assert 0 < len(rows) <= 16
    questions = {
        json.loads(x)["instruction"]
        for x in (data / "noisy_sums.jsonl").read_text().splitlines()
    }
    assert {r["instruction"] for r in rows} <= questions
    raw["dataset"] = "noisy_sums_robustft"
    config.write_text(yaml.safe_dump(raw))
    proc = run_lf(str(cli), "llamafactory", "train", config, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert len([h for h in state["log_history"] if "loss" in h]) == 2


@pytest.mark.slow
@pytest.mark.llamafactory_env
def test_denoise_that_keeps_no_row_is_an_error_and_writes_nothing(
    tmp_path, tiny_model_dir
):
    """A random tiny model as the expert agrees with no label: nothing is kept,
    and the command says so instead of writing an empty dataset."""
    python = llamafactory_python()
    config, data = _denoise_sample(tmp_path, tiny_model_dir)
    raw = yaml.safe_load(config.read_text())
    raw["prefalign"]["robustft"].update(max_new_tokens=4, answer_max_new_tokens=4)
    config.write_text(yaml.safe_dump(raw))
    cli = Path(python).parent / "prefalign"
    proc = run_lf(str(cli), "llamafactory", "denoise", config, cwd=tmp_path)
    assert proc.returncode == 1
    assert "RobustFTError: RobustFT left no training rows of dataset 'noisy_sums'" in (
        proc.stderr
    )
    assert not (data / "noisy_sums_robustft.jsonl").exists()
    assert "noisy_sums_robustft" not in json.loads(
        (data / "dataset_info.json").read_text()
    )
