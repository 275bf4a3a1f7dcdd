"""How each stage works: the paper's way, or an option beyond it, picked by config.

Every value of each setting below is one named unit; `pick_options` reads the
`prefalign.robustft` settings and the stages call the units it picked, so what an
option changes is declared once, in its unit (docs/methods.md#robustft).

    setting          the paper            beyond the paper
    expert_scoring   GenerateScoring      LoglikScoring
    expert_training  NoTraining           CrossfitTraining
    detection        AgreementDetection   CleanlabDetection
    review           ModelReview          RuleReview
    selection        EntropySelection     QuotaSelection
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from datasets import Dataset

from ..core.config import RobustFTConfig
from ..core.shards import ShardWriter
from .crossfit import (
    CACHE_DIR,
    LoraCrossfit,
    crossfit_option_probs,
    fold_cache_key,
)
from .detect import detect_noise
from .errors import RobustFTError
from .experts import CROSSFIT_EXPERT, model_alias
from .predict import Predictor, Scorer
from .relabel import review_labels
from .report import label_key
from .select import select_by_entropy, select_by_quota

if TYPE_CHECKING:  # stages imports this module; the context is only a type here
    from .stages import RunContext

LOG = logging.getLogger("axolotl_prefalign")


# ------------------------------------------------- expert_scoring (stage: predict)


class Scoring(Protocol):
    """How an expert's plain prediction ŷ is made."""

    option_probs: ClassVar[bool]  # rows get option probabilities
    meta: ClassVar[Mapping[str, str]]  # written into each expert's manifest

    def check(self, rows: Dataset) -> dict[str, Any]:
        """Check the rows; what report.json should note about them."""

    def scorer(self, ctx: RunContext, path: str) -> Scorer | None:
        """The option scorer of the expert at `path` (None: generate only)."""


class GenerateScoring:
    """expert_scoring: generate (paper): ŷ is the answer the expert generates."""

    option_probs = False
    meta: ClassVar[Mapping[str, str]] = {}

    def check(self, rows: Dataset) -> dict[str, Any]:
        return {}

    def scorer(self, ctx: RunContext, path: str) -> Scorer | None:
        return None


class LoglikScoring:
    """expert_scoring: loglik: ŷ of a multiple-choice row is its option with the
    highest summed log-likelihood; other rows fall back to generation."""

    option_probs = True
    meta: ClassVar[Mapping[str, str]] = {"scoring": "loglik"}

    def check(self, rows: Dataset) -> dict[str, Any]:
        """Count the rows without options (logged once, noted in the report)."""
        n = sum(1 for r in rows if r["kind"] != "choice") if len(rows) else 0
        if n:
            LOG.warning(
                "robustft: expert_scoring loglik scores multiple-choice rows only; "
                "%d of %d row(s) are number/text answers and use the generated "
                "plain answer",
                n,
                len(rows),
            )
        return {"loglik_fallback_rows": n}

    def scorer(self, ctx: RunContext, path: str) -> Scorer | None:
        return ctx.models.scorer(path)


# ------------------------------------- expert_training (stage: one more expert)


class Training(Protocol):
    """Whether an expert is trained on the noisy labels themselves."""

    option_probs: ClassVar[bool]
    probs_expert: ClassVar[str | None]  # whose option probabilities detection uses
    extra_experts: ClassVar[tuple[str, ...]]  # names it adds to the report

    def check(self, rows: Dataset) -> dict[str, Any]:
        """Check the rows; what report.json should note about them."""

    def train(self, ctx: RunContext, rows: Dataset) -> dict[str, Dataset]:
        """Predictions of the trained expert(s), by name."""


class NoTraining:
    """expert_training: none (paper): the experts vote as they are."""

    option_probs = False
    probs_expert = None
    extra_experts = ()

    def check(self, rows: Dataset) -> dict[str, Any]:
        return {}

    def train(self, ctx: RunContext, rows: Dataset) -> dict[str, Dataset]:
        return {}


class CrossfitTraining:
    """expert_training: crossfit: a LoRA of the base model trained on the other
    folds' labels scores each held-out row (out-of-fold option probabilities)."""

    option_probs = True
    probs_expert = CROSSFIT_EXPERT
    extra_experts = (CROSSFIT_EXPERT,)

    def check(self, rows: Dataset) -> dict[str, Any]:
        """Every row must be multiple choice: the folds score options."""
        other = [r["idx"] for r in rows if r["kind"] != "choice"] if len(rows) else []
        if other:
            raise RobustFTError(
                "expert_training: crossfit needs multiple-choice rows (an options "
                f"column); {len(other)} row(s) are number or text answers (first: "
                f"row {other[0]})"
            )
        return {}

    def train(self, ctx: RunContext, rows: Dataset) -> dict[str, Dataset]:
        """The out-of-fold option probabilities, resumable under crossfit/."""
        from ..core.models import resolve_model_path

        ctx.models.release()  # the folds load their own copy of the base model
        settings, fit, default = ctx.settings, ctx.crossfit_fit, None
        # one name per model ("prefalign:default" and its prepared folder alike)
        base = resolve_model_path(model_alias(ctx.base_path))
        if fit is None:
            fit = default = LoraCrossfit(
                base,
                epochs=settings.crossfit_epochs,
                learning_rate=settings.crossfit_learning_rate,
                lora_r=settings.crossfit_lora_r,
                batch_size=settings.crossfit_batch_size,
                seed=settings.seed,
                score_batch_size=settings.batch_size,
                load_in_4bit=ctx.load_in_4bit,
            )
        out_dir = ctx.out_dir / CACHE_DIR
        if ctx.crossfit_root is not None:
            key = fold_cache_key(list(rows), settings, base, ctx.load_in_4bit)
            out_dir = ctx.crossfit_root / CACHE_DIR / key[:16]
        try:
            oof = crossfit_option_probs(
                rows,
                fit,
                folds=settings.crossfit_folds,
                seed=settings.seed,
                out_dir=out_dir,
            )
        except ValueError as err:
            raise RobustFTError(str(err)) from None
        finally:
            if default is not None:
                default.release()
        return {CROSSFIT_EXPERT: oof}


# ---------------------------------------------------- detection (stage: detect)


class Detection(Protocol):
    """How the rows are split into clean and noisy (docs/methods.md#robustft-detect)."""

    def detect(
        self, rows: Dataset, predictions: Mapping[str, Dataset], ctx: RunContext
    ) -> Dataset:
        """`rows` with the experts' votes and a `noisy` column."""


def _detect(
    rows: Dataset, predictions: Mapping[str, Dataset], ctx: RunContext, rule: str
) -> Dataset:
    return detect_noise(
        rows,
        predictions,
        agreement=ctx.settings.agreement,
        rel_tol=ctx.settings.number_rel_tol,
        detection=rule,
        probs_expert=ctx.options.training.probs_expert,
    )


class AgreementDetection:
    """detection: agreement (paper): clean when the predictions agree with the
    label (`agreement`: all, majority or any of them)."""

    def detect(
        self, rows: Dataset, predictions: Mapping[str, Dataset], ctx: RunContext
    ) -> Dataset:
        return _detect(rows, predictions, ctx, "agreement")


class CleanlabDetection:
    """detection: cleanlab: noisy = cleanlab's find_label_issues(labels, option
    probabilities) (confident learning)."""

    def detect(
        self, rows: Dataset, predictions: Mapping[str, Dataset], ctx: RunContext
    ) -> Dataset:
        return _detect(rows, predictions, ctx, "cleanlab")


# ------------------------------------------------------- review (stage: review)


class Review(Protocol):
    """How a noisy row's pseudo-label is decided (docs/methods.md#robustft-relabel)."""

    def review(self, ds: Dataset, ctx: RunContext, predictor: Predictor) -> Dataset:
        """`ds` with `new_label` (None: dropped) and `drop_reason`."""


class ModelReview:
    """review: model (paper): the model reviews the reasoning- and
    context-enhanced answers and gives the pseudo-label (review/ shards)."""

    def review(self, ds: Dataset, ctx: RunContext, predictor: Predictor) -> Dataset:
        s = ctx.settings
        return review_labels(
            ds,
            mode="model",
            rel_tol=s.number_rel_tol,
            predictor=predictor,
            max_new_tokens=s.answer_max_new_tokens,
            batch_size=s.batch_size,
            writer=ShardWriter(ctx.out_dir / "review", meta={"stage": "review"}),
        )


class RuleReview:
    """review: rule: a fixed agreement rule over the two answers and the
    entropy decides the pseudo-label (no model call)."""

    def review(self, ds: Dataset, ctx: RunContext, predictor: Predictor) -> Dataset:
        s = ctx.settings
        return review_labels(ds, mode="rule", rel_tol=s.number_rel_tol)


# ---------------------------------------------------- selection (stage: select)


class Selection(Protocol):
    """Which relabelled rows are kept (docs/methods.md#robustft-select)."""

    cut_reason: ClassVar[str]  # drop_reason of a relabelled row left out

    def select(
        self, candidates: Dataset, rows: Dataset, ratio: float
    ) -> tuple[Dataset, dict[str, Any]]:
        """(kept rows, what report.json should note) from a non-empty set."""


class EntropySelection:
    """selection: entropy (paper): the ceil(β·n) lowest-entropy relabelled rows."""

    cut_reason = "entropy above the select_ratio cut"

    def select(
        self, candidates: Dataset, rows: Dataset, ratio: float
    ) -> tuple[Dataset, dict[str, Any]]:
        return select_by_entropy(candidates, ratio), {}


class QuotaSelection:
    """selection: quota: the same total split per label like the input labels,
    lowest entropy within each label."""

    cut_reason = "entropy above its label's quota (selection: quota)"

    def select(
        self, candidates: Dataset, rows: Dataset, ratio: float
    ) -> tuple[Dataset, dict[str, Any]]:
        keyed = candidates.add_column(
            "label_key", [label_key(r["kind"], r["new_label"]) for r in candidates]
        )
        selected, quotas = select_by_quota(
            keyed,
            ratio,
            [label_key(r["kind"], r["label"]) for r in rows],
            label_column="label_key",
        )
        return selected, {"selection_quotas": quotas}


# ------------------------------------------------------------------- the pick

# Setting → value → its unit. tests/test_robustft_options.py checks that every
# value a setting accepts has one.
OPTIONS: dict[str, dict[str, Any]] = {
    "expert_scoring": {"generate": GenerateScoring(), "loglik": LoglikScoring()},
    "expert_training": {"none": NoTraining(), "crossfit": CrossfitTraining()},
    "detection": {"agreement": AgreementDetection(), "cleanlab": CleanlabDetection()},
    "review": {"model": ModelReview(), "rule": RuleReview()},
    "selection": {"entropy": EntropySelection(), "quota": QuotaSelection()},
}


@dataclass(frozen=True)
class Options:
    """The units one run uses, one per setting."""

    scoring: Scoring
    training: Training
    detection: Detection
    review: Review
    selection: Selection

    @property
    def option_probs(self) -> bool:
        """True when the rows carry option probabilities (written to all.jsonl)."""
        return self.scoring.option_probs or self.training.option_probs


def pick_options(settings: RobustFTConfig) -> Options:
    """The unit of each setting's value."""
    return Options(
        scoring=OPTIONS["expert_scoring"][settings.expert_scoring],
        training=OPTIONS["expert_training"][settings.expert_training],
        detection=OPTIONS["detection"][settings.detection],
        review=OPTIONS["review"][settings.review],
        selection=OPTIONS["selection"][settings.selection],
    )
