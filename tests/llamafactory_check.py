"""Run the launcher inside LLaMA-Factory's environment and record what trained.

    python tests/llamafactory_check.py compare CONFIG.yaml OUT.json
    python tests/llamafactory_check.py not-ours CONFIG.yaml

`compare` runs `prefalign llamafactory train CONFIG` in this process with a thin
recording subclass of our trainer: for every batch it keeps our loss and metrics
and, on the same batch and weights, LLaMA-Factory's own: `get_batch_loss_metrics`
of its `CustomDPOTrainer` and the sequence log-probs of its `concatenated_forward`
and `compute_reference_log_probs` (from which a test computes hinge and IPO by
their formulas). `not-ours` undoes our trainer's installation after the launcher
made it, so LLaMA-Factory's stock trainer trains: the launcher must fail.
Not a test module: tests/test_llamafactory.py runs it with LLaMA-Factory's Python.
"""

from __future__ import annotations

import json
import sys

import torch
from llamafactory_recorder import recording_install


def _floats(t: torch.Tensor) -> list[float]:
    return [float(x) for x in t.detach().float().cpu()]


def compare(config: str, out_path: str) -> None:
    import llamafactory.train.dpo.trainer as lf_trainer

    from axolotl_prefalign.integrations.llamafactory import launcher

    stock = lf_trainer.CustomDPOTrainer
    records: list[dict] = []

    def record(trainer, model, batch, train_eval, loss, metrics) -> None:
        with torch.no_grad():
            lf_loss, lf_metrics = stock.get_batch_loss_metrics(
                trainer, model, batch, train_eval
            )
            policy = stock.concatenated_forward(trainer, model, batch)
            ref_c, ref_r = stock.compute_reference_log_probs(trainer, model, batch)
        valid = (batch["labels"][:, 1:] != -100).sum(-1)
        records.append(
            {
                "step": trainer.state.global_step,
                "loss": float(loss),
                "metrics": metrics,
                "lf_loss": float(lf_loss),
                "lf_metrics": lf_metrics,
                "lf_loss_type": trainer.loss_type,
                "beta": trainer.beta,
                "policy_chosen": _floats(policy["chosen_logps"]),
                "policy_rejected": _floats(policy["rejected_logps"]),
                "ref_chosen": _floats(ref_c),
                "ref_rejected": _floats(ref_r),
                "lengths": [int(x) for x in valid],
            }
        )

    launcher.install = recording_install(launcher.install, record)
    launcher.train(config)
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump(records, fh)


def not_ours(config: str) -> None:
    import llamafactory.train.dpo.trainer as lf_trainer

    from axolotl_prefalign.integrations.llamafactory import launcher

    stock = lf_trainer.CustomDPOTrainer
    install = launcher.install

    def undone(pa):
        ours = install(pa)
        lf_trainer.CustomDPOTrainer = stock
        return ours

    launcher.install = undone
    try:
        launcher.train(config)
    except launcher.LaunchError as err:
        print(f"LaunchError: {err}")
        raise SystemExit(3) from None


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "compare":
        compare(sys.argv[2], sys.argv[3])
    elif mode == "not-ours":
        not_ours(sys.argv[2])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
