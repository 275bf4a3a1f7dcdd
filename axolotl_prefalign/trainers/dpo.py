"""The plugin's DPO trainer for `rl: dpo` (installed through `trainer_cls:`).

Per batch: ONE forward of the policy over chosen and rejected together (TRL's
collator already stacks them), with the lm_head run on a single position only; the
response log-probs come from the backbone's hidden states through the fused
`token_logprobs`. The reference is the same model with its LoRA adapter disabled
(no second copy in memory), a separate frozen model for full fine-tuning, or TRL's
per-dataset cache (`prefalign.reference_cache`). Losses come from `losses.py`; SPA
adds self-refinement and de-coupled noise detection (METHODS.md §1).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from axolotl.core.trainers.dpo.trainer import AxolotlDPOTrainer
from torch import nn
from trl.trainer.utils import use_adapter

from ..args import PrefAlignConfig
from ..logprobs import mixed_token_logprobs, token_logprobs
from ..losses import MarginWindow, preference_loss

IGNORE = -100


def _current_prefalign() -> PrefAlignConfig:
    from axolotl.integrations.base import PluginManager

    from ..plugin import prefalign_config

    cfg = PluginManager.get_instance().cfg
    return prefalign_config(cfg) if cfg is not None else PrefAlignConfig()


def completion_labels(input_ids: torch.Tensor, completion_mask: torch.Tensor):
    """Next-token labels aligned with hidden[:, :-1]: -100 outside the completion."""
    labels = input_ids[:, 1:].clone()
    labels[completion_mask[:, 1:] == 0] = IGNORE
    return labels


class _HiddenCapture:
    """Forward hook on the decoder that keeps its final (post-norm) hidden states."""

    def __init__(self, decoder: nn.Module):
        self.decoder = decoder
        self.hidden: torch.Tensor | None = None

    def __enter__(self) -> _HiddenCapture:
        self.handle = self.decoder.register_forward_hook(self._hook)
        return self

    def _hook(self, module, args, output) -> None:
        self.hidden = (
            output.last_hidden_state
            if hasattr(output, "last_hidden_state")
            else output[0]
        )

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside PEFT/accelerate wrappers."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = _causal_lm(model).get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(
            "prefalign's fused log-prob path needs a plain nn.Linear lm_head, got "
            f"{type(head).__name__}; do not put lm_head in lora_target_modules"
        )
    return head.weight, head.bias


JUDGE_FIELDS = ("judge_prob",)


class JudgeFieldsCollator:
    """TRL's preference collator plus SPA's per-pair judge fields as tensors."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        for name in JUDGE_FIELDS:
            if name in examples[0]:
                batch[name] = torch.tensor(
                    [float(e[name]) for e in examples], dtype=torch.float32
                )
        return batch


class PrefAlignDPOTrainer(AxolotlDPOTrainer):
    """Axolotl's DPO trainer with the fused log-prob path and prefalign's losses."""

    tag_names = ["axolotl", "dpo", "prefalign"]

    def __init__(self, *args: Any, prefalign: PrefAlignConfig | None = None, **kw):
        # Set before TRL's __init__: it may precompute reference log-probs there.
        self.prefalign = prefalign or _current_prefalign()
        self.loss_name = self.prefalign.loss or "sigmoid"
        spa = self.prefalign.spa
        self.margin_window = MarginWindow(spa.margin_window)
        self.dnd_lambda = spa.dnd_lambda() if self.loss_name == "spa" else 0.0
        super().__init__(*args, **kw)
        self.data_collator = JudgeFieldsCollator(self.data_collator)

    # -- log-probs -----------------------------------------------------------
    def _hidden_states(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        kwargs = {
            "input_ids": inputs["input_ids"],
            "attention_mask": inputs["attention_mask"],
            "use_cache": False,
            # Only one position reaches the lm_head: the fused path does the rest.
            "logits_to_keep": 1,
        }
        with _HiddenCapture(_causal_lm(model).get_decoder()) as cap:
            model(**kwargs)
        if cap.hidden is None:
            raise RuntimeError("prefalign: the decoder hook saw no hidden states")
        return cap.hidden[:, :-1]

    def _reference_context(self, model: nn.Module):
        unwrapped = self.accelerator.unwrap_model(model)
        if self.ref_model is None and hasattr(unwrapped, "disable_adapter"):
            # As TRL: a fresh adapter's reference is the model with adapters off; a
            # re-trained adapter's is the frozen "ref" copy TRL made at start-up.
            name = "ref" if "ref" in unwrapped.peft_config else None
            return unwrapped, use_adapter(unwrapped, adapter_name=name)
        if self.ref_model is None:
            raise ValueError(
                "prefalign: no reference model: use adapter: lora/qlora (the "
                "reference is the model with the adapter disabled) or keep "
                "Axolotl's frozen reference copy"
            )
        return self.ref_model, contextlib.nullcontext()

    def _reference_hidden(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        ref, ctx = self._reference_context(model)
        with torch.no_grad(), ctx:
            return self._hidden_states(ref, inputs)

    def _sequence_logps(self, hidden, weight, bias, labels) -> torch.Tensor:
        lp = token_logprobs(
            hidden, weight, labels, bias=bias, chunk_size=self.prefalign.chunk_size
        )
        return lp.sum(-1)

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one batch (TRL calls this to fill its cache)."""
        labels = completion_labels(inputs["input_ids"], inputs["completion_mask"])
        ref, ctx = self._reference_context(model)
        with torch.no_grad(), ctx:
            hidden = self._hidden_states(ref, inputs)
            weight, bias = _head(ref)
            logps = self._sequence_logps(hidden, weight, bias, labels)
        return logps.chunk(2, dim=0)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # No full logits exist on the fused path: evaluation reports the loss and
        # the reward metrics only.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # -- loss ----------------------------------------------------------------
    def _compute_loss(self, model, inputs, return_outputs=False):
        mode = "train" if self.model.training else "eval"
        labels = completion_labels(inputs["input_ids"], inputs["completion_mask"])
        weight, bias = _head(model)
        hidden = self._hidden_states(model, inputs)
        logps = self._sequence_logps(hidden, weight, bias, labels)
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)

        need_ref_hidden = self.dnd_lambda > 0 or "ref_chosen_logps" not in inputs
        ref_hidden = self._reference_hidden(model, inputs) if need_ref_hidden else None
        if "ref_chosen_logps" in inputs:
            ref_chosen = inputs["ref_chosen_logps"].to(logps)
            ref_rejected = inputs["ref_rejected_logps"].to(logps)
        else:
            ref, _ = self._reference_context(model)
            ref_weight, ref_bias = _head(ref)
            with torch.no_grad():
                ref_logps = self._sequence_logps(
                    ref_hidden, ref_weight, ref_bias, labels
                )
            ref_chosen, ref_rejected = ref_logps.chunk(2, dim=0)

        lengths = (labels != IGNORE).sum(-1).to(logps)
        chosen_len, rejected_len = lengths.chunk(2, dim=0)
        extra: dict[str, Any] = {}
        if self.loss_name == "soft":
            if "judge_prob" not in inputs:
                raise ValueError(
                    "prefalign.loss: soft needs a judge_prob column (use "
                    "type: axolotl_prefalign.spa_pairs)"
                )
            extra["target_prob"] = inputs["judge_prob"].to(logps)
        if self.loss_name in ("cdpo", "robust"):
            extra["label_smoothing"] = self.prefalign.label_smoothing
        if self.loss_name == "spa":
            extra.update(
                self._spa_refinement(
                    mode,
                    inputs,
                    hidden,
                    ref_hidden,
                    labels,
                    weight,
                    model,
                    logps,
                    ref_chosen,
                    ref_rejected,
                )
            )
        losses = preference_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen,
            ref_rejected,
            loss_type=self.loss_name,
            beta=self.beta,
            chosen_lengths=chosen_len,
            rejected_lengths=rejected_len,
            **extra,
        )
        loss = losses.mean()
        self._log_dpo_metrics(
            mode, inputs, chosen_logps, rejected_logps, ref_chosen, ref_rejected
        )
        return (loss, None) if return_outputs else loss

    def _spa_refinement(
        self,
        mode,
        inputs,
        hidden,
        ref_hidden,
        labels,
        weight,
        model,
        logps,
        ref_chosen,
        ref_rejected,
    ) -> dict[str, Any]:
        """c = 1[β·m_g > τ]; m_g from DND (λ > 0) or the policy's own margin."""
        spa = self.prefalign.spa
        if self.dnd_lambda > 0:
            ref, _ = self._reference_context(model)
            ref_weight, ref_bias = _head(ref)
            _, bias = _head(model)
            # z_g = (1+λ)·z_θ − λ·z_ref: a simulated, more strongly aligned model.
            g_lp = mixed_token_logprobs(
                hidden.detach(),
                ref_hidden,
                weight.detach(),
                labels,
                mix=1.0 + self.dnd_lambda,
                ref_weight=ref_weight,
                bias=None if bias is None else bias.detach(),
                ref_bias=ref_bias,
                chunk_size=self.prefalign.chunk_size,
            ).sum(-1)
            g_chosen, g_rejected = g_lp.chunk(2, dim=0)
        else:
            g_chosen, g_rejected = logps.detach().chunk(2, dim=0)
        m_g = (g_chosen - ref_chosen) - (g_rejected - ref_rejected)
        scaled = self.beta * m_g.detach().float()
        if mode == "train":
            self.margin_window.update(scaled)
        tau = self.margin_window.threshold(spa.noise_quantile)
        confident = scaled > tau
        progress = self.state.global_step / max(self.state.max_steps, 1)
        alpha = 0.0 if progress < spa.alpha_warmup_ratio else spa.alpha
        m = self._metrics[mode]
        m["spa/threshold"].append(float(tau))
        m["spa/noisy_fraction"].append(
            self.accelerator.gather_for_metrics((~confident).float()).mean().item()
        )
        m["spa/dnd_margin"].append(
            self.accelerator.gather_for_metrics(scaled).mean().item()
        )
        m["spa/alpha"].append(alpha)
        return {"confident": confident, "alpha": alpha}

    def _log_dpo_metrics(self, mode, inputs, chosen, rejected, ref_c, ref_r) -> None:
        """TRL's metric names, so existing dashboards understand them."""
        gather = self.accelerator.gather_for_metrics
        chosen_rewards = self.beta * (chosen - ref_c).detach()
        rejected_rewards = self.beta * (rejected - ref_r).detach()
        m = self._metrics[mode]
        m["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        m["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        accuracies = (chosen_rewards > rejected_rewards).float()
        m["rewards/accuracies"].append(gather(accuracies).mean().item())
        margins = chosen_rewards - rejected_rewards
        m["rewards/margins"].append(gather(margins).mean().item())
        m["logps/chosen"].append(gather(chosen.detach()).mean().item())
        m["logps/rejected"].append(gather(rejected.detach()).mean().item())
        if mode == "train":
            tokens = gather(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens
        m["num_tokens"] = [self._total_train_tokens]
