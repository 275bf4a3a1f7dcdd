"""The recording trainer both LLaMA-Factory helper scripts install.

Not a test module: tests/llamafactory_check.py and tests/llamafactory_matrix.py import
it inside LLaMA-Factory's Python.
"""

from __future__ import annotations

from collections.abc import Callable


def recording_install(install: Callable, record: Callable) -> Callable:
    """Wrap the launcher's `install`: the trainer it makes becomes a thin subclass
    that calls `record(trainer, model, batch, train_eval, loss, metrics)` after
    each batch's loss, and is what LLaMA-Factory's DPO workflow builds."""
    import llamafactory.train.dpo.trainer as lf_trainer

    def recording(pa):
        ours = install(pa)

        class Recording(ours):
            def get_batch_loss_metrics(self, model, batch, train_eval="train"):
                loss, metrics = super().get_batch_loss_metrics(model, batch, train_eval)
                record(self, model, batch, train_eval, loss, metrics)
                return loss, metrics

        lf_trainer.CustomDPOTrainer = Recording
        return Recording

    return recording
