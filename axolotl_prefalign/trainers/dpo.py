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
from dataclasses import dataclass
from typing import Any

import torch
from axolotl.core.trainers.dpo.trainer import AxolotlDPOTrainer
from torch import nn
from trl.trainer.utils import use_adapter

from ..args import PrefAlignConfig
from ..heads import causal_lm, plain_lm_head
from ..logprobs import IGNORE_INDEX, mixed_token_logprobs, token_logprobs
from ..losses import MarginWindow, implicit_rewards, preference_loss


def _current_prefalign() -> PrefAlignConfig:
    from axolotl.integrations.base import PluginManager

    from ..plugin import prefalign_config

    cfg = PluginManager.get_instance().cfg
    return prefalign_config(cfg) if cfg is not None else PrefAlignConfig()


@dataclass
class BatchLayout:
    """How one preference batch reaches the model and how its tokens map back.

    Padded: `model_kwargs` is TRL's [2B, T] batch; `labels` is [2B, T-1], aligned
    with hidden[:, :-1]. Packed: all 2B sequences are one row without padding and
    position ids restart per sequence (varlen attention); `labels` is [N] aligned
    with every packed position, -100 at each sequence's last token, and `segment`
    says which sequence each position belongs to.
    """

    model_kwargs: dict[str, torch.Tensor]
    labels: torch.Tensor
    num_sequences: int
    segment: torch.Tensor | None = None

    @classmethod
    def padded(cls, inputs: dict) -> BatchLayout:
        labels = inputs["input_ids"][:, 1:].clone()
        labels[inputs["completion_mask"][:, 1:] == 0] = IGNORE_INDEX
        kwargs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
        return cls(kwargs, labels, inputs["input_ids"].shape[0])

    @classmethod
    def packed(cls, inputs: dict) -> BatchLayout:
        keep = inputs["attention_mask"].bool()
        lengths = keep.sum(-1)
        ids = inputs["input_ids"][keep]  # row-major: sequences back to back
        completion = inputs["completion_mask"][keep].bool()
        n = lengths.shape[0]
        segment = torch.repeat_interleave(torch.arange(n, device=ids.device), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        positions = torch.arange(ids.shape[0], device=ids.device) - starts[segment]
        # The label of position j is token j+1 of the same sequence, if it is a
        # completion token; a sequence's last position predicts nothing.
        labels = torch.full_like(ids, IGNORE_INDEX)
        same = segment[1:] == segment[:-1]
        nxt = same & completion[1:]
        labels[:-1][nxt] = ids[1:][nxt]
        kwargs = {"input_ids": ids[None], "position_ids": positions[None]}
        return cls(kwargs, labels, n, segment)

    def per_sequence(self, token_values: torch.Tensor) -> torch.Tensor:
        """Sum per-token values (shaped like `labels`) into one value per sequence."""
        if self.segment is None:
            return token_values.sum(-1)
        out = token_values.new_zeros(self.num_sequences)
        return out.index_add(0, self.segment, token_values)

    def lengths(self) -> torch.Tensor:
        """Completion tokens per sequence."""
        return self.per_sequence((self.labels != IGNORE_INDEX).float())


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

    def _set_signature_columns_if_needed(self):
        # Keep SPA's judge fields even under remove_unused_columns: true.
        super()._set_signature_columns_if_needed()
        for name in JUDGE_FIELDS:
            if name not in self._signature_columns:
                self._signature_columns.append(name)

    # -- log-probs -----------------------------------------------------------
    def _layout(self, inputs: dict) -> BatchLayout:
        if self.prefalign.packing:
            return BatchLayout.packed(inputs)
        return BatchLayout.padded(inputs)

    def _hidden_states(self, model: nn.Module, layout: BatchLayout) -> torch.Tensor:
        """Final hidden states aligned with `layout.labels`."""
        with _HiddenCapture(causal_lm(model).get_decoder()) as cap:
            # use_cache=False also lets transformers see packed position ids.
            # Only one position reaches the lm_head: the fused path does the rest.
            model(**layout.model_kwargs, use_cache=False, logits_to_keep=1)
        if cap.hidden is None:
            raise RuntimeError("prefalign: the decoder hook saw no hidden states")
        if layout.segment is not None:
            return cap.hidden[0]
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

    def _reference_hidden(self, model: nn.Module, layout: BatchLayout):
        ref, ctx = self._reference_context(model)
        with torch.no_grad(), ctx:
            return self._hidden_states(ref, layout)

    def _sequence_logps(self, hidden, weight, bias, layout) -> torch.Tensor:
        lp = token_logprobs(
            hidden,
            weight,
            layout.labels,
            bias=bias,
            chunk_size=self.prefalign.chunk_size,
        )
        seq = layout.per_sequence(lp)
        if not torch.isfinite(seq.detach()).all():
            # A NaN/inf log-prob would turn every later step into NaN silently.
            bad = (~torch.isfinite(seq.detach())).nonzero().flatten().tolist()
            raise FloatingPointError(
                f"prefalign: non-finite sequence log-probs at step "
                f"{self.state.global_step} (batch rows {bad}, chosen first then "
                "rejected): check the learning rate, fp16 overflow, or the rows"
            )
        return seq

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one batch (TRL calls this to fill its cache)."""
        layout = self._layout(inputs)
        ref, ctx = self._reference_context(model)
        with torch.no_grad(), ctx:
            hidden = self._hidden_states(ref, layout)
            weight, bias = plain_lm_head(ref)
            logps = self._sequence_logps(hidden, weight, bias, layout)
        return logps.chunk(2, dim=0)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # No full logits exist on the fused path: evaluation reports the loss and
        # the reward metrics only.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # -- loss ----------------------------------------------------------------
    def compute_loss(
        self, model, inputs, return_outputs=False, num_items_in_batch=None
    ):
        # Always our loss: TRL would route to its own (liger) loss on a flag.
        return self._compute_loss(model, inputs, return_outputs)

    def _compute_loss(self, model, inputs, return_outputs=False):
        mode = "train" if self.model.training else "eval"
        layout = self._layout(inputs)
        weight, bias = plain_lm_head(model)
        hidden = self._hidden_states(model, layout)
        logps = self._sequence_logps(hidden, weight, bias, layout)
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)

        cached = "ref_chosen_logps" in inputs
        ref_hidden = None
        if self.dnd_lambda > 0 or not cached:
            ref_hidden = self._reference_hidden(model, layout)
        if cached:
            ref_chosen = inputs["ref_chosen_logps"].to(logps)
            ref_rejected = inputs["ref_rejected_logps"].to(logps)
        else:
            ref_weight, ref_bias = plain_lm_head(self._reference_context(model)[0])
            with torch.no_grad():
                ref_logps = self._sequence_logps(
                    ref_hidden, ref_weight, ref_bias, layout
                )
            ref_chosen, ref_rejected = ref_logps.chunk(2, dim=0)

        chosen_len, rejected_len = layout.lengths().to(logps).chunk(2, dim=0)
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
            policy_margin = (chosen_logps - ref_chosen) - (
                rejected_logps - ref_rejected
            )
            m_g = policy_margin.detach()
            if self.dnd_lambda > 0:
                m_g = self._dnd_margin(
                    model, hidden, ref_hidden, layout, ref_chosen, ref_rejected
                )
            extra.update(self._spa_confidence(mode, m_g))
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
        self._log_dpo_metrics(
            mode, inputs, chosen_logps, rejected_logps, ref_chosen, ref_rejected
        )
        loss = losses.mean()
        return (loss, None) if return_outputs else loss

    def _dnd_margin(self, model, hidden, ref_hidden, layout, ref_chosen, ref_rejected):
        """m_g: the DPO margin of z_g = (1+λ)·z_θ − λ·z_ref, a simulated more
        strongly aligned model (SPA's de-coupled noise detection); no gradient."""
        weight, bias = plain_lm_head(model)
        ref_weight, ref_bias = plain_lm_head(self._reference_context(model)[0])
        token_lp = mixed_token_logprobs(
            hidden.detach(),
            ref_hidden,
            weight.detach(),
            layout.labels,
            mix=1.0 + self.dnd_lambda,
            ref_weight=ref_weight.detach(),
            bias=None if bias is None else bias.detach(),
            ref_bias=None if ref_bias is None else ref_bias.detach(),
            chunk_size=self.prefalign.chunk_size,
        )
        g_chosen, g_rejected = layout.per_sequence(token_lp).chunk(2, dim=0)
        return (g_chosen - ref_chosen) - (g_rejected - ref_rejected)

    def _spa_confidence(self, mode: str, m_g: torch.Tensor) -> dict[str, Any]:
        """c = 1[β·m_g > τ], τ the K-quantile of recent per-sample β·m_g; α = 0
        during the warm-up fraction of steps (SPA's self-refinement)."""
        spa = self.prefalign.spa
        scaled = self.beta * m_g.detach().float()
        if mode == "train":
            self.margin_window.update(scaled)
        if len(self.margin_window):
            tau = self.margin_window.threshold(spa.noise_quantile)
        else:  # evaluation before any training step: this batch alone
            tau = torch.quantile(scaled, spa.noise_quantile).item()
        confident = scaled > tau
        progress = self.state.global_step / max(self.state.max_steps, 1)
        alpha = 0.0 if progress < spa.alpha_warmup_ratio else spa.alpha
        gather = self.accelerator.gather_for_metrics
        m = self._metrics[mode]
        m["spa/threshold"].append(float(tau))
        m["spa/noisy_fraction"].append(gather((~confident).float()).mean().item())
        m["spa/dnd_margin"].append(gather(scaled).mean().item())
        m["spa/alpha"].append(alpha)
        return {"confident": confident.to(m_g.device), "alpha": alpha}

    def _log_dpo_metrics(self, mode, inputs, chosen, rejected, ref_c, ref_r) -> None:
        """TRL's metric names, so existing dashboards understand them."""
        gather = self.accelerator.gather_for_metrics
        chosen_rewards = implicit_rewards(chosen, ref_c, self.beta)
        rejected_rewards = implicit_rewards(rejected, ref_r, self.beta)
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
