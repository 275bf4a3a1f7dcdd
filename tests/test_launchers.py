"""DeepSpeed / FSDP through the launchers: the SPA loop's train stages (Axolotl and
LLaMA-Factory) and `prefalign llamafactory train`.

What is checked here is what the launchers generate (stage YAMLs, commands, the
arguments handed to LLaMA-Factory): accelerate refuses DeepSpeed and FSDP on a
machine without a GPU, and LLaMA-Factory refuses DeepSpeed outside a distributed
launch, so no engine runs here (tests/test_sharded_heads.py drives the engines
themselves on the CPU).
"""

from __future__ import annotations

import json
import logging
import sys
import types
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from test_spa_loop import FakeStages, _cfg
from test_spa_loop import spa_yaml as spa_yaml  # noqa: F401 - the fixture

from axolotl_prefalign.core.config import PrefAlignConfig, PrefAlignConfigError
from axolotl_prefalign.integrations.axolotl.spa_loop import run_from_config
from axolotl_prefalign.integrations.llamafactory import launcher
from axolotl_prefalign.spa.loop import iter_dir, run_command

LF_EXAMPLES = REPO / "yaml_examples" / "llamafactory"
# LLaMA-Factory 0.9.5's examples/deepspeed/ds_z3_config.json, as shipped.
LF_DS_Z3 = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_allow_untested_optimizer": True,
    "fp16": {
        "enabled": "auto",
        "loss_scale": 0,
        "loss_scale_window": 1000,
        "initial_scale_power": 16,
        "hysteresis": 2,
        "min_loss_scale": 1,
    },
    "bf16": {"enabled": "auto"},
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "sub_group_size": 1e9,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
}
# ds_z3_offload_config.json: the same with the optimizer and parameters on the CPU.
LF_DS_Z3_OFFLOAD = {
    **LF_DS_Z3,
    "zero_optimization": {
        **LF_DS_Z3["zero_optimization"],
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True},
    },
}


def _lf_deepspeed_folder(root: Path) -> None:
    folder = root / "examples" / "deepspeed"
    folder.mkdir(parents=True)
    (folder / "ds_z3_config.json").write_text(json.dumps(LF_DS_Z3))
    (folder / "ds_z3_offload_config.json").write_text(json.dumps(LF_DS_Z3_OFFLOAD))


class RecordingStages(FakeStages):
    """FakeStages that also keep each command."""

    def __init__(self):
        super().__init__()
        self.commands: list[list[str]] = []

    def __call__(self, cmd, log):
        self.commands.append(cmd)
        super().__call__(cmd, log)


# -- the Axolotl SPA loop --------------------------------------------------------


@pytest.mark.parametrize("engine", ["deepspeed", "fsdp2"])
def test_spa_train_stages_get_the_sharding_and_expansion_stays_one_process(
    spa_yaml,  # noqa: F811 - the fixture
    tmp_path,
    monkeypatch,
    engine,
):
    path, raw = spa_yaml
    monkeypatch.chdir(tmp_path)
    if engine == "deepspeed":
        Path("deepspeed_configs").mkdir()
        Path("deepspeed_configs/zero3.json").write_text(json.dumps(LF_DS_Z3))
        raw["deepspeed"] = "deepspeed_configs/zero3.json"  # as `axolotl fetch` puts it
    else:
        raw["fsdp_version"] = 2
        raw["fsdp_config"] = {"reshard_after_forward": True}
    raw["prefalign"]["spa"]["launcher"] = "accelerate"
    path.write_text(yaml.safe_dump(raw))
    stages = RecordingStages()
    run_from_config(_cfg(raw), path, runner=stages)
    out = Path(raw["output_dir"])
    trains = [c for c in stages.commands if c[3] == "train"]
    assert len(trains) == 3
    for i, cmd in enumerate(trains):
        assert cmd[-2:] == ["--launcher", "accelerate"]
        conf = yaml.safe_load((iter_dir(out, i) / "config.yml").read_text())
        if engine == "deepspeed":
            # Absolute: the stage YAML works from any working directory.
            assert conf["deepspeed"] == str(tmp_path / "deepspeed_configs/zero3.json")
        else:
            assert conf["fsdp_version"] == 2
            assert conf["fsdp_config"] == raw["fsdp_config"]
    expands = [c for c in stages.commands if c[3] == "prefalign"]
    assert [c[:5] for c in expands] == [
        [sys.executable, "-m", "axolotl.cli.main", "prefalign", "spa-expand"]
    ] * 2
    assert not any("--launcher" in c for c in expands)


def test_sharded_spa_stages_with_the_python_launcher_are_told(
    spa_yaml,  # noqa: F811 - the fixture
    caplog,
):
    path, raw = spa_yaml
    raw["deepspeed"] = {"zero_optimization": {"stage": 3}}
    path.write_text(yaml.safe_dump(raw))
    with caplog.at_level(logging.WARNING, logger="axolotl_prefalign"):
        run_from_config(_cfg(raw), path, runner=FakeStages())
    assert (
        "SPA: deepspeed reach every train stage, but prefalign.spa.launcher: python "
        "starts one process per stage; set prefalign.spa.launcher: accelerate"
    ) in caplog.text


def test_a_stage_started_under_a_launch_does_not_join_it(tmp_path, monkeypatch):
    # The loop run under torchrun/accelerate by mistake: rank 0 starts the stages,
    # which must start their own processes, not wait for the outer launch's ranks.
    launch = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
              "TORCHELASTIC_RUN_ID": "x"}  # fmt: skip
    for key, value in launch.items():
        monkeypatch.setenv(key, value)
    names = sorted(launch)
    probe = f"import os; print(sorted(set({names}) & set(os.environ)))"
    log = tmp_path / "stage.log"
    run_command([sys.executable, "-c", probe], log)
    assert log.read_text().strip() == "[]"


# -- the LLaMA-Factory SPA loop ----------------------------------------------------


@pytest.mark.parametrize(
    "sharding",
    [
        {"deepspeed": "examples/deepspeed/ds_z3_config.json"},
        {"fsdp": "full_shard auto_wrap", "fsdp_config": {"version": 2}},
    ],
    ids=["deepspeed", "fsdp2"],
)
def test_llamafactory_spa_stages_keep_the_sharding(tmp_path, sharding):
    from axolotl_prefalign.integrations.llamafactory.spa_loop import (
        LlamaFactoryTrainings,
    )

    args = yaml.safe_load((LF_EXAMPLES / "spa_loop.yaml").read_text())
    block = args.pop("prefalign")
    args.update(sharding)
    pa = PrefAlignConfig.from_raw(block)
    t = LlamaFactoryTrainings(args, block, pa.spa, tmp_path / "c.yaml", "base", True)
    shard = tmp_path / "shard.jsonl"
    shard.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    for i, pairs in ((0, None), (1, [str(shard)])):
        conf_path, _ = t.write_train_config(i, "base", iter_dir(tmp_path, i), pairs)
        conf = yaml.safe_load(conf_path.read_text())
        assert {k: conf[k] for k in sharding} == sharding
        # The launcher re-launches itself under torchrun on several GPUs.
        assert t.train_command(conf_path) == [
            sys.executable, "-m", launcher.MODULE, str(conf_path)
        ]  # fmt: skip
    expand = t.expand_command(1, tmp_path / "iter_1")
    assert expand[:3] == [sys.executable, "-m", t.expand_command.__module__]
    assert expand[3] == "expand"


# -- prefalign llamafactory train --------------------------------------------------


def _lf_config(tmp_path: Path, **extra) -> Path:
    c = yaml.safe_load((LF_EXAMPLES / "dpo_prefalign.yaml").read_text())
    c.update(model_name_or_path="/models/base", dataset_dir=str(tmp_path), **extra)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(c))
    return path


@pytest.mark.parametrize("ds", ["ds_z3_config.json", "ds_z3_offload_config.json"])
def test_llamafactory_zero3_relaunches_under_torchrun_with_the_deepspeed_key(
    tmp_path, monkeypatch, ds
):
    monkeypatch.chdir(tmp_path)
    _lf_deepspeed_folder(tmp_path)
    config = _lf_config(tmp_path, deepspeed=f"examples/deepspeed/{ds}")
    monkeypatch.setattr(launcher, "check_version", lambda: "0.9.5")
    for key in ("LOCAL_RANK", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("FORCE_TORCHRUN", "1")
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    ran = []

    def fake_run(cmd, check):
        ran.append(cmd)
        return types.SimpleNamespace(returncode=0)

    monkeypatch.setattr("subprocess.run", fake_run)
    with pytest.raises(SystemExit) as done:
        launcher.train(config)
    assert done.value.code == 0
    (cmd,) = ran
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2"
    assert cmd[-3:] == ["-m", launcher.MODULE, str(config)]
    # What each torchrun process then reads: the deepspeed key, stage 3.
    args, _ = launcher.read_config(config)
    conf = json.loads(Path(args["deepspeed"]).read_text())
    assert conf["zero_optimization"]["stage"] == 3


def _fake_run_exp(monkeypatch) -> list[dict]:
    seen: list[dict] = []
    tuner = types.ModuleType("llamafactory.train.tuner")
    tuner.run_exp = lambda args: seen.append(dict(args))
    for name in ("llamafactory", "llamafactory.train"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "llamafactory.train.tuner", tuner)
    return seen


@pytest.mark.parametrize(
    "sharding, env",
    [
        ({"deepspeed": "examples/deepspeed/ds_z3_config.json"}, {}),
        ({"fsdp": "full_shard auto_wrap", "fsdp_config": {"version": 2}}, {}),
        ({}, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}),
    ],
    ids=["zero3", "fsdp2_keys", "fsdp2_accelerate"],
)
def test_each_llamafactory_process_installs_our_trainer_and_passes_the_sharding(
    tmp_path, monkeypatch, sharding, env
):
    """One process of the launch (LOCAL_RANK set: torchrun's child, or accelerate's):
    precheck passes, our trainer is installed, LLaMA-Factory's run_exp gets the
    sharding keys (LLaMA-Factory itself is faked: not installed in this env)."""
    monkeypatch.chdir(tmp_path)
    _lf_deepspeed_folder(tmp_path)
    info = {"prefalign_spa_seed": {"file_name": "p.jsonl",
            "formatting": "prefalign_pairs", "ranking": True}}  # fmt: skip
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    row = {"prompt": "p", "chosen": "a", "rejected": "b"}
    (tmp_path / "p.jsonl").write_text(json.dumps(row) + "\n")
    config = _lf_config(tmp_path, do_train=False, **sharding)
    monkeypatch.setattr(launcher, "check_version", lambda: "0.9.5")
    monkeypatch.setenv("LOCAL_RANK", "0")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    installed = []
    monkeypatch.setattr(
        launcher,
        "install",
        lambda pa: installed.append(pa) or type("PrefAlignLFTrainer", (), {}),
    )
    seen = _fake_run_exp(monkeypatch)
    launcher.train(config)
    assert installed and installed[0].loss == "robust"
    (args,) = seen
    assert {k: args[k] for k in sharding} == sharding
    assert args["dataset_dir"] == str(tmp_path)  # clean data: precheck left it


@pytest.mark.parametrize(
    "sharding, env, start, fix",
    [
        (
            {},
            {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"},
            "the accelerate config of this launch (FSDP_VERSION=1; fsdp_version "
            "missing or 1 in its fsdp_config) selects FSDP1",
            "set fsdp_version: 2 in that file's fsdp_config, or use DeepSpeed ZeRO-3",
        ),
        (
            {"fsdp": "full_shard auto_wrap", "fsdp_config": {"min_num_params": 0}},
            {},
            "fsdp_config without version (transformers' default: 1) selects FSDP1",
            "set fsdp_config: {version: 2}, or use DeepSpeed ZeRO-3",
        ),
        (
            {
                "deepspeed": "examples/deepspeed/ds_z3_config.json",
                "additional_target": "embed_tokens,lm_head",
            },
            {},
            "deepspeed: examples/deepspeed/ds_z3_config.json (ZeRO stage 3) with "
            "additional_target: lm_head fails inside DeepSpeed on the first forward "
            "('Linear' object has no attribute 'ds_grads_remaining', DeepSpeed issue "
            "#7203)",
            "train the head fully (finetuning_type: full) or remove it from "
            "additional_target, or use a ZeRO stage 2 config",
        ),
    ],
    ids=["fsdp1_accelerate", "fsdp1_keys", "zero3_head"],
)
def test_llamafactory_dpo_the_fused_path_cannot_shard_stops_at_launch(
    tmp_path, monkeypatch, sharding, env, start, fix
):
    monkeypatch.chdir(tmp_path)
    _lf_deepspeed_folder(tmp_path)
    config = _lf_config(tmp_path, **sharding)
    monkeypatch.setattr(launcher, "check_version", lambda: "0.9.5")
    monkeypatch.setenv("LOCAL_RANK", "0")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    _fake_run_exp(monkeypatch)
    with pytest.raises(PrefAlignConfigError) as err:
        launcher.train(config)
    assert str(err.value).startswith(start)
    assert str(err.value).endswith(fix)


@pytest.mark.parametrize(
    "name, keys",
    [
        ("dpo_prefalign_zero3.yaml", {"deepspeed"}),
        ("dpo_prefalign_fsdp.yaml", {"fsdp", "fsdp_config"}),
    ],
)
def test_scale_out_samples_are_the_trained_dpo_sample_plus_the_sharding(
    name, keys, monkeypatch
):
    # dpo_prefalign.yaml trains in tests/test_llamafactory.py; these differ only by
    # the sharding keys (and output_dir), which the launcher's checks accept.
    from axolotl_prefalign.integrations.llamafactory.scale_out import check_scale_out

    base, _ = launcher.read_config(LF_EXAMPLES / "dpo_prefalign.yaml")
    args, pa = launcher.read_config(LF_EXAMPLES / name)
    assert set(args) - set(base) == keys
    assert {k: v for k, v in args.items() if k not in keys | {"output_dir"}} == {
        k: v for k, v in base.items() if k != "output_dir"
    }
    launcher.resolve(args, pa)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    check_scale_out(args, {})
    if "fsdp_config" in keys:
        assert args["fsdp_config"]["version"] == 2
