"""`prefalign llamafactory train CONFIG.yaml [key=value ...]`: LLaMA-Factory's
workflow, our trainer.

CONFIG is a LLaMA-Factory YAML plus a `prefalign:` block (the same block an Axolotl
YAML has), read as `llamafactory-cli` reads it, `key=value` overrides included
(config_file.py). The launcher takes the block out, checks it against the rest,
registers our dataset converters, puts `PrefAlignLFTrainer` where `run_dpo` looks for
`CustomDPOTrainer`, and calls LLaMA-Factory's own `run_exp` with the remaining keys
(LLaMA-Factory rejects unknown ones). Nothing else of LLaMA-Factory is patched.

- `stage: dpo` trains with prefalign's fused log-probs and loss; the loss is
  `prefalign.loss`, or LLaMA-Factory's `pref_loss` when the block leaves it unset
  (sigmoid, hinge, ipo — computed as their formulas, where LLaMA-Factory on trl >=
  0.20 silently computes sigmoid for the latter two).
- `stage: sft` is LLaMA-Factory's own SFT (e.g. contrast SFT on the rows
  `axolotl prefalign export` wrote), with our converters registered.
- More than one process (several GPUs, or FORCE_TORCHRUN=1): the launcher
  re-launches itself under torchrun, so that every process installs the trainer
  (`llamafactory-cli`'s own re-launch would lose it); a `deepspeed:` config goes
  along in the YAML. Under `accelerate launch --config_file FSDP.yaml -m MODULE`
  each process runs the launcher itself (no re-launch). DPO under FSDP1, or ZeRO-3
  with `additional_target: lm_head`, stops first (scale_out.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...core.config import PrefAlignConfig, PrefAlignConfigError
from ...core.models import DEFAULT_MODEL_ALIAS

LOG = logging.getLogger("axolotl_prefalign")

# LLaMA-Factory releases this launcher was tested against (its trainer internals
# are not a public API: a new release must be tested before it is added here).
TESTED_VERSIONS = ("0.9.5",)
UNTESTED_ENV = "PREFALIGN_LLAMAFACTORY_UNTESTED"
STAGES = ("dpo", "sft")
# LLaMA-Factory's pref_loss values our trainer computes, by our name.
PREF_LOSSES = {"sigmoid": "sigmoid", "hinge": "hinge", "ipo": "ipo"}
# LLaMA-Factory DPO settings our trainer would bypass, with what to use instead.
CONFLICTING_KEYS = {
    "pref_ftx": "nothing: the SFT term is not part of prefalign's losses",
    "pref_bco_weight": "nothing: BCO is not implemented by prefalign",
    "ld_alpha": "nothing: LD-DPO is not implemented by prefalign",
    "dpo_label_smoothing": "prefalign.loss: cdpo (or robust) with "
    "prefalign.label_smoothing",
}
MODULE = "axolotl_prefalign.integrations.llamafactory.launcher"
# `formatting:` of prefalign pair rows in dataset_info.json (converters.py).
PAIRS_FORMATTING = "prefalign_pairs"


class LaunchError(RuntimeError):
    """The launcher cannot run this config (or our trainer did not train)."""


def log_to_stderr() -> None:
    """Our progress messages on stderr (no Axolotl here to configure logging)."""
    ours = logging.getLogger("axolotl_prefalign")
    if not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(levelname)s|prefalign] %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


def read_raw(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A config and its `key=value` overrides as LLaMA-Factory reads them."""
    from .config_file import ConfigFileError, read_args

    try:
        return read_args(path, overrides)
    except ConfigFileError as err:
        raise LaunchError(str(err)) from None


def read_config(
    path: str | Path, overrides: Sequence[str] = ()
) -> tuple[dict[str, Any], PrefAlignConfig]:
    """(LLaMA-Factory's arguments, the validated `prefalign:` block) of a config."""
    raw = read_raw(path, overrides)
    block = raw.pop("prefalign", None)
    return raw, PrefAlignConfig.from_raw(block)


def check_version() -> str:
    """The installed LLaMA-Factory version; an error when it is missing or untested."""
    try:
        import llamafactory
    except ImportError as err:
        raise LaunchError(
            "LLaMA-Factory is not installed in this environment: pip install "
            f"'llamafactory=={TESTED_VERSIONS[-1]}' (it needs its own environment, "
            "apart from Axolotl's)"
        ) from err
    version = llamafactory.__version__
    if version not in TESTED_VERSIONS and not os.environ.get(UNTESTED_ENV):
        raise LaunchError(
            f"LLaMA-Factory {version} is not a release prefalign was tested with "
            f"({', '.join(TESTED_VERSIONS)}); install one of those, or set "
            f"{UNTESTED_ENV}=1 to try it anyway"
        )
    return version


def resolve(args: dict[str, Any], pa: PrefAlignConfig) -> PrefAlignConfig:
    """Check the `prefalign:` block against LLaMA-Factory's own keys and settle the
    loss; fills `pref_beta` with SPA's β when the YAML leaves it unset."""
    stage = args.get("stage", "sft")
    if stage not in STAGES:
        raise PrefAlignConfigError(
            f"prefalign llamafactory train runs stage dpo or sft, got {stage!r}; "
            "run other stages with llamafactory-cli"
        )
    if stage == "sft":
        if pa.trainer_active:
            raise PrefAlignConfigError(
                "prefalign.loss / fused_logprobs need stage: dpo (stage is sft)"
            )
        if pa.contrast.unlikelihood_weight > 0:
            raise PrefAlignConfigError(
                "prefalign.contrast.unlikelihood_weight needs the Axolotl plugin's "
                "trainer; LLaMA-Factory SFT trains the exported contrast rows plainly"
            )
        return pa
    pref_loss = args.get("pref_loss", "sigmoid")
    if pref_loss not in PREF_LOSSES:
        raise PrefAlignConfigError(
            f"pref_loss: {pref_loss} is not one of prefalign's losses "
            f"({', '.join(PREF_LOSSES)} or prefalign.loss); run it with "
            "llamafactory-cli"
        )
    if pa.loss and pref_loss != "sigmoid" and PREF_LOSSES[pref_loss] != pa.loss:
        raise PrefAlignConfigError(
            f"pref_loss: {pref_loss} and prefalign.loss: {pa.loss} disagree; keep one"
        )
    bad = [k for k in CONFLICTING_KEYS if args.get(k) not in (None, 0, 0.0, False)]
    if bad:
        advice = "; ".join(f"{k} → use {CONFLICTING_KEYS[k]}" for k in bad)
        raise PrefAlignConfigError(
            "these LLaMA-Factory settings conflict with prefalign's DPO trainer (it "
            f"would bypass them): {advice}"
        )
    loss = pa.loss or PREF_LOSSES[pref_loss]
    if loss == "soft":
        raise PrefAlignConfigError(
            "prefalign.loss: soft needs each pair's judge_prob, which LLaMA-Factory's "
            "pairwise data loader drops; use it with the Axolotl plugin"
        )
    if pa.reference_cache:
        raise PrefAlignConfigError(
            "prefalign.reference_cache is TRL's reference precompute, which "
            "LLaMA-Factory's trainer turns off; remove it"
        )
    if loss == "spa" and args.get("pref_beta") is None:
        args["pref_beta"] = pa.spa.beta
    return PrefAlignConfig.from_raw({**pa.model_dump(), "loss": loss})


def install(pa: PrefAlignConfig) -> type:
    """Register our converters and put our trainer where `run_dpo` finds it."""
    import llamafactory.train.dpo.trainer as lf_trainer

    from .converters import register_converters
    from .trainer import PrefAlignLFTrainer

    register_converters()
    PrefAlignLFTrainer.prefalign = pa
    PrefAlignLFTrainer.built = PrefAlignLFTrainer.batches_seen = 0
    PrefAlignLFTrainer.ended_at = None
    lf_trainer.CustomDPOTrainer = PrefAlignLFTrainer
    return PrefAlignLFTrainer


def processes() -> int:
    """How many processes LLaMA-Factory would launch (1: no re-launch)."""
    forced = os.environ.get("FORCE_TORCHRUN", "").lower() in ("1", "true", "y")
    try:
        import torch

        devices = torch.cuda.device_count()
    except ImportError:  # pragma: no cover - torch is a dependency
        devices = 0
    if not forced and devices <= 1:
        return 1
    return int(os.environ.get("NPROC_PER_NODE") or max(devices, 1))


def torchrun_command(
    config: str | Path, nproc: int, overrides: Sequence[str] = ()
) -> list[str]:
    """This launcher under torchrun, with LLaMA-Factory's launch environment."""
    env = os.environ
    port = env.get("MASTER_PORT")
    if not port:
        with socket.socket() as s:
            s.bind(("", 0))
            port = str(s.getsockname()[1])
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        env.get("NNODES", "1"),
        "--node_rank",
        env.get("NODE_RANK", "0"),
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        env.get("MASTER_ADDR", "127.0.0.1"),
        "--master_port",
        port,
        "-m",
        MODULE,
        str(config),
        *overrides,
    ]


def dataset_names(args: dict[str, Any]) -> list[str]:
    """The names of `dataset:` (a comma-separated string or a list)."""
    names = args.get("dataset") or []
    if isinstance(names, str):
        names = names.split(",")
    return [n.strip() for n in names if n.strip()]


def precheck(args: dict[str, Any], pa: PrefAlignConfig) -> None:
    """Check local `formatting: prefalign_pairs` files line by line; under
    `on_bad_row: skip` LLaMA-Factory reads checked copies (a rewritten
    dataset_info.json in the cache) without the bad rows."""
    from ...core.dataset_info import read_info
    from ...core.local_data import DataFileError, keep_checked, read_local
    from ...core.models import cache_dir
    from ...spa.pairs import normalize_pair

    dataset_dir = Path(args.get("dataset_dir") or "data")
    info_path = dataset_dir / "dataset_info.json"
    names = dataset_names(args) + dataset_names({"dataset": args.get("eval_dataset")})
    if not names or not info_path.exists():
        return  # LLaMA-Factory reports a missing dataset_info.json itself
    try:
        info = read_info(info_path)
    except DataFileError as err:
        raise LaunchError(str(err)) from None
    changed = False
    for name in names:
        entry = info.get(name)
        if not entry or entry.get("formatting") != PAIRS_FORMATTING:
            continue
        if "file_name" not in entry:
            continue  # a hub dataset: the converter checks each row
        path = dataset_dir / entry["file_name"]
        try:
            data = read_local(path, source=str(path), on_bad_row=pa.on_bad_row)
        except DataFileError as err:
            raise LaunchError(f"dataset {name!r}: {err}") from None
        try:
            checked = keep_checked(
                data,
                lambda rows, checker: (
                    i
                    for i, row in enumerate(rows)
                    if normalize_pair(row, i, checker) is not None
                ),
                pa.on_bad_row,
                copy_always=bool(data.recoded),  # LLaMA-Factory reads UTF-8 only
            )
        except DataFileError as err:
            raise LaunchError(str(err)) from None
        if checked.copy is not None:
            entry["file_name"] = str(checked.copy)
            changed = True
    if changed:
        # Relative file names resolve against the new folder: make them absolute.
        for entry in info.values():
            if "file_name" in entry and not Path(entry["file_name"]).is_absolute():
                entry["file_name"] = str((dataset_dir / entry["file_name"]).resolve())
        digest = hashlib.sha256(json.dumps(info, sort_keys=True).encode())
        folder = cache_dir() / "checked" / digest.hexdigest()[:16]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "dataset_info.json").write_text(json.dumps(info, indent=1))
        args["dataset_dir"] = str(folder)


def train(config: str | Path, overrides: Sequence[str] = ()) -> None:
    """Run one LLaMA-Factory training with prefalign's trainer and converters."""
    import subprocess

    args, pa = read_config(config, overrides)
    version = check_version()
    if args.get("model_name_or_path") == DEFAULT_MODEL_ALIAS:
        # The embedded SmolLM2-135M-Instruct, as with the Axolotl plugin.
        from ...core.models import prepare_default_model

        args["model_name_or_path"] = str(prepare_default_model())
    pa = resolve(args, pa)
    if args.get("stage") == "dpo":
        from .scale_out import check_scale_out

        check_scale_out(args, os.environ)
    nproc = processes()
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        cmd = torchrun_command(config, nproc, overrides)
        LOG.info("prefalign: %d processes: re-launching under torchrun", nproc)
        raise SystemExit(subprocess.run(cmd, check=False).returncode)
    precheck(args, pa)
    trainer = install(pa)
    stage = args.get("stage", "sft")
    what = f"trainer {trainer.__name__}, loss {pa.loss}" if stage == "dpo" else ""
    print(f"prefalign: LLaMA-Factory {version}, stage {stage} {what}", flush=True)
    from llamafactory.train.tuner import run_exp

    run_exp(args)
    if stage == "dpo" and args.get("do_train"):
        check_trained(trainer)


def check_trained(trainer: type) -> None:
    """After a DPO run: an error unless our trainer trained, or was built and
    found nothing left to train (a finished run resumed at its last step)."""
    if trainer.batches_seen:
        return
    ended = trainer.ended_at
    if trainer.built and ended is not None and ended[2] and ended[0] >= ended[1]:
        step, max_steps, checkpoint = ended
        LOG.info(
            "prefalign: nothing left to train: resumed at step %d of %d from %s "
            "(to train again: overwrite_output_dir: true, or a new output_dir)",
            step,
            max_steps,
            checkpoint,
        )
        return
    what = (
        f"{trainer.__name__} was built but computed no batch"
        if trainer.built
        else f"{trainer.__name__} was never built"
    )
    raise LaunchError(
        f"LLaMA-Factory trained without prefalign's trainer ({what}); this "
        "LLaMA-Factory release may build its DPO trainer differently"
    )


def main() -> None:
    """`python -m axolotl_prefalign.integrations.llamafactory.launcher CONFIG ...`."""
    if len(sys.argv) < 2:
        raise SystemExit(f"usage: python -m {MODULE} CONFIG.yaml [key=value ...]")
    log_to_stderr()
    train(sys.argv[1], sys.argv[2:])


if __name__ == "__main__":
    main()
