"""The framework-neutral preference step: one DPO-family loss over a pair batch.

Given a model, a way to get its reference and a batch laid out as TRL's collator
lays it out (chosen rows, then rejected rows; `completion_mask` marks the response
tokens), `PreferenceStep` runs ONE forward of the policy with the lm_head on a
single position only, takes the response log-probs from the backbone's hidden
states through the fused `token_logprobs`, gets the reference log-probs (from the
batch's cached columns or a no-grad pass of the reference), adds SPA's
self-refinement and de-coupled noise detection (docs/methods.md#spa-dnd), and
returns the per-pair losses with the metric values under TRL's names. A trainer
subclass of any framework (Axolotl/TRL, LLaMA-Factory) turns these into its loss
and logs; nothing here imports one.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import PrefAlignConfig
from .heads import (
    causal_lm,
    head_in_use,
    head_weights,
    lm_head_weights,
    through_output,
)
from .logprobs import IGNORE_INDEX, mixed_token_logprobs, token_logprobs
from .losses import MarginWindow, implicit_rewards, preference_loss

# model -> (reference module, context in which it computes the reference); e.g.
# (the PEFT model, adapters disabled) or (a frozen copy, nullcontext()).
Reference = Callable[[nn.Module], tuple[nn.Module, contextlib.AbstractContextManager]]


@dataclass
class BatchLayout:
    """How one preference batch reaches the model and how its tokens map back.

    Padded: `model_kwargs` is the [2B, T] batch; `labels` is [2B, T-1], aligned
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


class HiddenCapture:
    """Forward hook on the decoder that keeps its final (post-norm) hidden states."""

    def __init__(self, decoder: nn.Module):
        self.decoder = decoder
        self.hidden: torch.Tensor | None = None

    def __enter__(self) -> HiddenCapture:
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


# SPA's per-pair fields carried from the dataset into the batch, with their dtype:
# the judge's probability, and the pair's id (its prompt's source row; -1 for
# labelled rows) by which the noise flags are recorded.
JUDGE_FIELDS = {"judge_prob": torch.float32, "pair_id": torch.int64}


class JudgeFieldsCollator:
    """A preference collator plus SPA's per-pair judge fields as tensors."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        for name, dtype in JUDGE_FIELDS.items():
            if name in examples[0]:
                kind = float if dtype.is_floating_point else int
                values = [kind(e[name]) for e in examples]
                batch[name] = torch.tensor(values, dtype=dtype)
        return batch


class FlagRecorder:
    """Appends each training pair's SPA noise flags to a JSON-lines file, keyed by
    pair id, for the gold report (`spa.gold`). Every process writes its own
    file (`<name>.rank<k>` for k > 0): the pairs a process trains on are its own,
    so no gather is needed; the first write of a run truncates the file."""

    def __init__(self, path: str | Path):
        self.base = Path(path)
        self.path: Path | None = None

    def write(self, rows: list[dict[str, Any]]) -> None:
        mode = "a"
        if self.path is None:
            distributed = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if distributed else int(os.environ.get("RANK", 0))
            name = self.base.name + (f".rank{rank}" if rank else "")
            self.path, mode = self.base.with_name(name), "w"
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, mode, encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


@dataclass
class StepOutput:
    """Per-pair losses, the sequence log-probs, and the metrics of one step.

    `metrics` maps TRL's names to a per-pair (or per-sample) tensor, which the
    trainer gathers across processes and averages, or to a plain float.
    """

    losses: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)


class PreferenceStep:
    """prefalign's DPO step for one trainer: fused log-probs, reference, loss."""

    def __init__(self, config: PrefAlignConfig, reference: Reference):
        self.config = config
        self.reference = reference
        self.loss_name = config.loss or "sigmoid"
        self.margin_window = MarginWindow(config.spa.margin_window)
        self.dnd_lambda = config.spa.dnd_lambda() if self.loss_name == "spa" else 0.0
        # Gold configured (the SPA loop sets flags_file): record each pair's flags,
        # and with DND on also the flags the plain margins would give (own window).
        record = self.loss_name == "spa" and config.spa.flags_file
        self.flags = FlagRecorder(config.spa.flags_file) if record else None
        self.plain_window = MarginWindow(config.spa.margin_window)

    # -- log-probs -----------------------------------------------------------
    def layout(self, inputs: dict) -> BatchLayout:
        if self.config.packing:
            return BatchLayout.packed(inputs)
        return BatchLayout.padded(inputs)

    def hidden_states(self, model: nn.Module, layout: BatchLayout) -> torch.Tensor:
        """Final hidden states aligned with `layout.labels`."""
        with HiddenCapture(causal_lm(model).get_decoder()) as cap:
            # use_cache=False also lets transformers see packed position ids.
            # Only one position reaches the lm_head: the fused path does the rest.
            out = model(**layout.model_kwargs, use_cache=False, logits_to_keep=1)
        if cap.hidden is None:
            raise RuntimeError("prefalign: the decoder hook saw no hidden states")
        hidden = through_output(model, cap.hidden, out)
        if layout.segment is not None:
            return hidden[0]
        return hidden[:, :-1]

    def sequence_logps(self, hidden, weight, bias, layout, *, step: int):
        lp = token_logprobs(
            hidden,
            weight,
            layout.labels,
            bias=bias,
            chunk_size=self.config.chunk_size,
            vocab_tile=self.config.vocab_tile,
        )
        seq = layout.per_sequence(lp)
        if not torch.isfinite(seq.detach()).all():
            # A NaN/inf log-prob would turn every later step into NaN silently.
            bad = (~torch.isfinite(seq.detach())).nonzero().flatten().tolist()
            raise FloatingPointError(
                f"prefalign: non-finite sequence log-probs at step {step} (batch "
                f"rows {bad}, chosen first then rejected): check the learning rate, "
                "fp16 overflow, or the rows"
            )
        return seq

    def reference_logps(self, model: nn.Module, inputs: dict, *, step: int):
        """(chosen, rejected) reference log-probs of one batch, without gradient."""
        logps, _ = self.reference_pass(model, self.layout(inputs), step=step)
        return logps.chunk(2, dim=0)

    def reference_pass(
        self,
        model: nn.Module,
        layout: BatchLayout,
        *,
        step: int,
        logps: bool = True,
        policy: tuple[torch.Tensor, nn.Linear] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The reference's sequence log-probs (if `logps`) and, given the policy's
        (hidden, lm_head module), the DND mix's (SPA); one no-grad reference forward.

        The heads are read inside the reference context: with a PEFT adapter
        disabled, the lm_head in use is the original, not the adapter's copy. Both
        are gathered (ZeRO-3, FSDP2) only after the reference forward.
        """
        ref, ctx = self.reference(model)
        ref_logps = mixed = None
        with torch.no_grad(), ctx:
            hidden = self.hidden_states(ref, layout)
            with lm_head_weights(ref) as head:
                if logps:
                    ref_logps = self.sequence_logps(hidden, *head, layout, step=step)
                if policy is not None:
                    with head_weights(policy[1]) as policy_head:
                        mixed = self.mixed_logps(
                            policy[0], policy_head, hidden, head, layout
                        )
        return ref_logps, mixed

    # -- loss ----------------------------------------------------------------
    def __call__(
        self,
        model: nn.Module,
        inputs: dict,
        *,
        beta: float,
        training: bool,
        step: int,
        max_steps: int,
    ) -> StepOutput:
        """Per-pair losses and metrics of one batch (reference columns
        `ref_chosen_logps`/`ref_rejected_logps` are used when the batch has them)."""
        layout = self.layout(inputs)
        hidden = self.hidden_states(model, layout)
        cached = "ref_chosen_logps" in inputs
        ref_logps = mixed = None
        # The policy's head is picked after its forward, before the reference
        # context switches the adapter (and its lm_head copy) off.
        policy_head = head_in_use(model)
        with head_weights(policy_head) as head:
            logps = self.sequence_logps(hidden, *head, layout, step=step)
        if self.dnd_lambda > 0 or not cached:
            policy = (hidden, policy_head) if self.dnd_lambda > 0 else None
            ref_logps, mixed = self.reference_pass(
                model, layout, step=step, logps=not cached, policy=policy
            )
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)
        if cached:
            ref_chosen = inputs["ref_chosen_logps"].to(logps)
            ref_rejected = inputs["ref_rejected_logps"].to(logps)
        else:
            ref_chosen, ref_rejected = ref_logps.chunk(2, dim=0)

        chosen_len, rejected_len = layout.lengths().to(logps).chunk(2, dim=0)
        metrics: dict[str, torch.Tensor | float] = {}
        extra: dict[str, Any] = {}
        if self.loss_name == "soft":
            if "judge_prob" not in inputs:
                raise ValueError(
                    "prefalign.loss: soft needs a judge_prob column (use "
                    "type: axolotl_prefalign.spa_pairs)"
                )
            extra["target_prob"] = inputs["judge_prob"].to(logps)
        if self.loss_name in ("cdpo", "robust"):
            extra["label_smoothing"] = self.config.label_smoothing
        if self.loss_name == "spa":
            policy_margin = (chosen_logps - ref_chosen) - (
                rejected_logps - ref_rejected
            )
            m_g = policy_margin.detach()
            if mixed is not None:
                m_g = self.dnd_margin(mixed, ref_chosen, ref_rejected)
            confident, alpha = self.spa_confidence(
                m_g, beta=beta, training=training, progress=step / max(max_steps, 1)
            )
            extra.update(confident=confident, alpha=alpha)
            metrics.update(self.spa_metrics)
            if self.flags is not None and training:
                self.record_flags(inputs, policy_margin, confident, beta, step, alpha)
        losses = preference_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen,
            ref_rejected,
            loss_type=self.loss_name,
            beta=beta,
            chosen_lengths=chosen_len,
            rejected_lengths=rejected_len,
            **extra,
        )
        metrics.update(
            reward_metrics(chosen_logps, rejected_logps, ref_chosen, ref_rejected, beta)
        )
        return StepOutput(
            losses, chosen_logps, rejected_logps, ref_chosen, ref_rejected, metrics
        )

    def mixed_logps(self, hidden, head, ref_hidden, ref_head, layout):
        """Sequence log-probs of z_g = (1+λ)·z_θ − λ·z_ref, a simulated more
        strongly aligned model (SPA's de-coupled noise detection); no gradient."""
        (weight, bias), (ref_weight, ref_bias) = head, ref_head
        token_lp = mixed_token_logprobs(
            hidden.detach(),
            ref_hidden,
            weight.detach(),
            layout.labels,
            mix=1.0 + self.dnd_lambda,
            ref_weight=ref_weight.detach(),
            bias=None if bias is None else bias.detach(),
            ref_bias=None if ref_bias is None else ref_bias.detach(),
            chunk_size=self.config.chunk_size,
            vocab_tile=self.config.vocab_tile,
        )
        return layout.per_sequence(token_lp)

    @staticmethod
    def dnd_margin(mixed, ref_chosen, ref_rejected):
        """m_g: the DPO margin of the DND mix's sequence log-probs."""
        g_chosen, g_rejected = mixed.chunk(2, dim=0)
        return (g_chosen - ref_chosen) - (g_rejected - ref_rejected)

    def spa_confidence(
        self, m_g: torch.Tensor, *, beta: float, training: bool, progress: float
    ) -> tuple[torch.Tensor, float]:
        """c = 1[β·m_g > τ], τ the K-quantile of recent per-sample β·m_g; α = 0
        during the warm-up fraction of steps (SPA's self-refinement). Leaves the
        step's SPA metrics in `self.spa_metrics`."""
        spa = self.config.spa
        scaled = beta * m_g.detach().float()
        if training:
            self.margin_window.update(scaled)
        if len(self.margin_window):
            tau = self.margin_window.threshold(spa.noise_quantile)
        else:  # evaluation before any training step: this batch alone
            tau = torch.quantile(scaled, spa.noise_quantile).item()
        confident = scaled > tau
        alpha = 0.0 if progress < spa.alpha_warmup_ratio else spa.alpha
        self.spa_metrics = {
            "spa/threshold": float(tau),
            "spa/noisy_fraction": (~confident).float(),
            "spa/dnd_margin": scaled,
            "spa/alpha": alpha,
        }
        return confident.to(m_g.device), alpha

    def plain_confidence(
        self, policy_margin: torch.Tensor, *, beta: float
    ) -> tuple[torch.Tensor, float]:
        """c without DND: 1[β·h > τ_h], τ_h the same quantile of recent per-sample
        β·h (the policy's own DPO margins) in a window of its own; no gradient."""
        scaled = beta * policy_margin.detach().float()
        self.plain_window.update(scaled)
        tau = self.plain_window.threshold(self.config.spa.noise_quantile)
        return scaled > tau, tau

    def record_flags(self, inputs, policy_margin, confident, beta, step, alpha):
        """One training batch's flags by pair id: c with DND (the loss's c; None
        when λ = 0) and c from the plain margins (the loss's c when λ = 0)."""
        if "pair_id" not in inputs:
            raise ValueError(
                "prefalign.spa.flags_file: the batch has no pair_id column (load "
                "the pairs with type: axolotl_prefalign.spa_pairs)"
            )
        scaled_g = self.spa_metrics["spa/dnd_margin"]
        tau = self.spa_metrics["spa/threshold"]
        if self.dnd_lambda > 0:
            plain, tau_plain = self.plain_confidence(policy_margin, beta=beta)
            scaled_h = beta * policy_margin.detach().float()
        else:
            plain, tau_plain, scaled_h = confident, tau, scaled_g
        dnd = self.dnd_lambda > 0
        # One host copy per tensor, not one sync per pair.
        columns = zip(
            inputs["pair_id"].tolist(),
            confident.tolist(),
            plain.tolist(),
            scaled_g.tolist(),
            scaled_h.tolist(),
            strict=True,
        )
        self.flags.write(
            [
                {
                    "pair_id": int(pid),
                    "step": step,
                    "confident_dnd": bool(c_g) if dnd else None,
                    "confident_plain": bool(c_h),
                    "margin_dnd": m_g if dnd else None,
                    "margin_plain": m_h,
                    "tau_dnd": tau if dnd else None,
                    "tau_plain": tau_plain,
                    "alpha": alpha,
                    "dnd_lambda": self.dnd_lambda,
                }
                for pid, c_g, c_h, m_g, m_h in columns
            ]
        )


def reward_metrics(chosen, rejected, ref_chosen, ref_rejected, beta: float):
    """TRL's metric names (rewards/*, logps/*), so existing dashboards read them."""
    chosen_rewards = implicit_rewards(chosen, ref_chosen, beta)
    rejected_rewards = implicit_rewards(rejected, ref_rejected, beta)
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": chosen.detach(),
        "logps/rejected": rejected.detach(),
    }
