"""The `prefalign:` block of a YAML: one pydantic model per method.

Axolotl's own schema silently drops unknown keys, so every model here forbids extra
keys and `PrefAlignConfig.from_raw` turns pydantic's error into one that names the
bad key and the valid ones. Defaults are the papers' values (docs/methods.md).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

LossType = Literal["sigmoid", "cdpo", "robust", "ipo", "hinge", "soft", "spa"]
BadRowPolicy = Literal["error", "skip"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ContrastFields(_Strict):
    """Column names of a preference row for the contrast format."""

    prompt: str = Field(
        "prompt", description="The question: text, or a list of chat messages."
    )
    chosen: str = Field("chosen", description="The preferred (positive) answer.")
    rejected: str = Field("rejected", description="The rejected (negative) answer.")
    messages: str = Field(
        "messages",
        description="Chat-style prompt used when the prompt column is absent: the "
        "last user message is the question, earlier turns are context.",
    )
    instruction: str = Field(
        "instruction", description="Optional per-row instruction (overrides default)."
    )
    system: str = Field("system", description="Optional per-row system text.")


# The placeholders each template part must contain (exactly once each).
CONTRAST_TEMPLATE_PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "system": ("system",),
    "instruction": ("instruction",),
    "turn": ("role", "content"),
    "question": ("question",),
    "negative": ("negative",),
    "positive": ("positive",),
}


class ContrastConfig(_Strict):
    """Plaintext contrast SFT, negative-answer masking (docs/methods.md#contrast)."""

    preset: Literal["en", "zh"] = Field(
        "en",
        description="Marker words: en (Instruction/Question/...) or zh (指令/...).",
    )
    template: dict[str, str] | None = Field(
        None,
        description="Custom template parts with named placeholders, overriding the "
        "preset's parts that it names; parts are joined with newlines. Keys: "
        "system {system}, instruction {instruction}, turn {role} {content}, "
        "question {question}, negative {negative}, positive {positive} (must end "
        "with {positive}).",
    )
    instruction: str | None = Field(
        None,
        description="Default instruction text; the preset's when unset, no "
        "instruction line when empty.",
    )
    mode: Literal["raw", "chat"] = Field(
        "raw",
        description="raw text, or the model's chat template: the contrast text up "
        "to the positive-answer marker as the user turn, the answer as the reply.",
    )
    order: Literal["negative_first", "positive_first"] = Field(
        "negative_first",
        description="Where the negative slot goes; after the positive answer (and "
        "its end token) it carries no loss.",
    )
    positive_only_ratio: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Fraction of rows rendered with no negative slot (train/inference "
        "match); picked per row from seed and row index.",
    )
    unlikelihood_weight: float = Field(
        0.0,
        ge=0.0,
        description="Weight of the CUT-style -log(1-p) term on negative-answer "
        "tokens (0 = plain SFT, no extra column).",
    )
    seed: int = Field(42, description="Seed of the positive-only row choice.")
    curriculum: Literal["margin", "length"] | None = Field(
        None,
        description="Train the rows from easy to hard instead of shuffled: margin = "
        "the base model's summed log-prob of the chosen answer minus the rejected "
        "one after the contrast prompt (large = easy; computed once and cached), "
        "length = tokens of both answers (short = easy). Needs Axolotl's "
        "curriculum_sampling: true.",
    )
    curriculum_order: Literal["easy_first", "hard_first"] = Field(
        "easy_first",
        description="easy_first (curriculum learning) or hard_first (anti-curriculum).",
    )
    curriculum_batch_size: int = Field(
        8, ge=1, description="Pairs per forward pass when scoring margins."
    )
    curriculum_cache_dir: str | None = Field(
        None,
        description="Where scored margins are kept (one folder per model, data and "
        "settings); default <dataset_prepared_path>/prefalign_curriculum, else "
        "~/.cache/axolotl_prefalign/curriculum.",
    )
    fields: ContrastFields = Field(default_factory=ContrastFields)

    @model_validator(mode="before")
    @classmethod
    def _template_is_not_a_preset(cls, data: Any) -> Any:
        # `template: en` is the natural first guess; pydantic's own message
        # ("Input should be a valid dictionary") does not say what to write.
        if isinstance(data, dict) and isinstance(data.get("template"), str):
            raise ValueError(
                f"template must be a mapping of template parts, got "
                f"{data['template']!r}; a preset is chosen with `preset: en` (or "
                "`preset: zh`), and `template:` overrides single parts, e.g. "
                "`template: {question: 'Q: {question}'}`"
            )
        return data

    @model_validator(mode="after")
    def _check_template(self) -> ContrastConfig:
        import string

        for key, part in (self.template or {}).items():
            wanted = CONTRAST_TEMPLATE_PLACEHOLDERS.get(key)
            if wanted is None:
                raise ValueError(
                    f"template key {key!r} is not one of "
                    f"{', '.join(CONTRAST_TEMPLATE_PLACEHOLDERS)}"
                )
            try:
                names = [f for _, f, _, _ in string.Formatter().parse(part) if f]
            except ValueError as err:
                raise ValueError(f"template.{key}: {err}") from None
            if sorted(names) != sorted(wanted):
                need = " ".join("{" + n + "}" for n in wanted)
                raise ValueError(
                    f"template.{key} must contain {need} exactly once and no other "
                    f"placeholder, got {part!r}"
                )
        positive = (self.template or {}).get("positive")
        if positive is not None and not positive.endswith("{positive}"):
            raise ValueError(
                "template.positive must end with {positive}: the end token follows "
                f"the answer directly, got {positive!r}"
            )
        return self


class SpaPromptSource(_Strict):
    """Where the fresh prompts of SPA iterations come from."""

    path: str = Field(
        ..., description="Local .jsonl/.json/.csv/.parquet file or dataset folder."
    )
    field: str = Field("prompt", description="Column holding the prompt text.")
    split: str = Field("train", description="Split to read (dataset folders/files).")
    name: str | None = Field(
        None,
        description="The dataset's name when `path` is a LLaMA-Factory "
        "dataset_info.json (alpaca or sharegpt; the prompt column is `prompt`).",
    )
    gold_field: str | None = Field(
        None,
        description="Column with each prompt's correct answer (a letter or an "
        "option's text with gold_options_field): the loop then writes "
        "iter_<i>/gold_report.json (self-label accuracy, noise-flag precision/recall).",
    )
    gold_options_field: str | None = Field(
        None,
        description="Column with each prompt's list of option texts (multiple "
        "choice): a sample is judged by the option it names, letter or text.",
    )

    @model_validator(mode="after")
    def _options_need_gold(self) -> SpaPromptSource:
        if self.gold_options_field and not self.gold_field:
            raise ValueError(
                "gold_options_field needs gold_field (the column with the correct "
                "answer)"
            )
        return self


@dataclass(frozen=True)
class SpaEffect:
    """What a change to an SPA setting affects, declared beside each `SpaConfig`
    field; the SPA loop derives its staleness key and the trainer's settings from it."""

    name: str


# The generated and judged pairs: the value is part of an expansion's key, so a
# change makes finished expansions stale.
EXPANSION = SpaEffect("expansion")
# Which prompts each iteration gets: the key holds the prompts picked, not the value.
PROMPTS = SpaEffect("prompts")
TRAINING = SpaEffect("training")  # passed on to each stage's trainer
LOOP = SpaEffect("loop")  # read by the loop alone: in neither the key nor the trainer


class SpaConfig(_Strict):
    """SPA: Spread Preference Annotation (docs/methods.md#spa)."""

    beta: Annotated[float, EXPANSION, TRAINING] = Field(
        0.1, gt=0.0, description="Implicit-reward / DPO beta."
    )
    iterations: Annotated[int, PROMPTS] = Field(
        3, ge=1, description="Expand → train rounds after seed DPO."
    )
    iteration: Annotated[int, TRAINING] = Field(
        1, ge=0, description="Iteration being trained now (0 = seed DPO); picks λ."
    )
    seed_epochs: Annotated[int, LOOP] = Field(
        3, ge=1, description="Epochs of seed DPO (< ~2K pairs)."
    )
    num_samples: Annotated[int, EXPANSION] = Field(
        2, ge=2, description="Responses sampled per prompt (K)."
    )
    temperature: Annotated[float, EXPANSION] = Field(
        0.7, ge=0.0, description="Sampling temperature."
    )
    top_p: Annotated[float, EXPANSION] = Field(
        1.0, gt=0.0, le=1.0, description="Nucleus sampling mass."
    )
    max_new_tokens: Annotated[int, EXPANSION] = Field(
        300, ge=1, description="Longest sampled response."
    )
    generation_batch_size: Annotated[int, EXPANSION] = Field(
        8, ge=1, description="Prompts per generate call."
    )
    judge_batch_size: Annotated[int, EXPANSION] = Field(
        8, ge=1, description="Prompts per judge forward (all K responses each)."
    )
    generation_backend: Annotated[Literal["auto", "hf", "vllm"], EXPANSION] = Field(
        "auto", description="auto: vLLM when installed and on a GPU, else HF generate."
    )
    shard_size: Annotated[int, EXPANSION] = Field(
        64, ge=1, description="Prompts per output shard (the unit of resuming)."
    )
    max_prompt_tokens: Annotated[int, EXPANSION] = Field(
        1024, ge=1, description="Longer prompts are bad rows (official recipe: 1024)."
    )
    launcher: Annotated[Literal["python", "accelerate", "torchrun"], LOOP] = Field(
        "python",
        description="How the SPA loop launches each `axolotl train` stage "
        "(accelerate/torchrun for several GPUs).",
    )
    length_normalized: Annotated[bool, EXPANSION] = Field(
        False, description="Judge by per-token reward (counters length growth)."
    )
    init_model: Annotated[str | None, EXPANSION] = Field(
        None,
        description="π_init for judging; None = the base model with the adapter off.",
    )
    alpha: Annotated[float, TRAINING] = Field(
        0.1, ge=0.0, le=0.5, description="Smoothing of noisy pairs."
    )
    noise_quantile: Annotated[float, TRAINING] = Field(
        0.1, gt=0.0, lt=1.0, description="K: this least-confident fraction is noisy."
    )
    margin_window: Annotated[int, TRAINING] = Field(
        50, ge=1, description="Recent micro-batches whose per-sample margins set τ."
    )
    alpha_warmup_ratio: Annotated[float, TRAINING] = Field(
        0.2, ge=0.0, le=1.0, description="α = 0 for this first fraction of steps."
    )
    dnd: Annotated[bool, TRAINING] = Field(
        True, description="De-coupled noise detection (paper: on)."
    )
    dnd_lambdas: Annotated[list[float], TRAINING] = Field(
        default_factory=lambda: [0.5, 0.25, 0.125],
        description="λ per iteration 1, 2, 3, ... (last value repeats).",
    )
    prompts: Annotated[list[SpaPromptSource], PROMPTS] = Field(
        default_factory=list,
        description="One source per iteration, or one split into disjoint parts.",
    )
    prompts_per_iteration: Annotated[list[int] | None, PROMPTS] = Field(
        None,
        description="Sizes of the disjoint parts when one source is split (default: "
        "equal parts); with one source per iteration, a cap per source.",
    )
    seed: Annotated[int, EXPANSION] = Field(
        42, description="Sampling seed (per block of prompts)."
    )
    gold_checker: Annotated[Literal["choice", "contains", "exact", "rule"], LOOP] = (
        Field(
            "choice",
            description="How a sampled answer is judged against a prompt source's "
            "gold_field: choice = the one option it names (letter or text; none or "
            "several = unknown), contains = the gold text appears in it, exact = "
            "equal (both normalised), rule = gold_field holds a rule the answer "
            "keeps or breaks ('max_words: N' or 'answer_line': the last non-empty "
            "line reads 'Answer: ...').",
        )
    )
    # LOOP: a YAML's own value never reaches the trainer; the loop sets each stage's.
    flags_file: Annotated[str | None, LOOP] = Field(
        None,
        description="Internal, set by the SPA loop when gold is configured: the "
        "JSON-lines file where the SPA loss records each training pair's noise "
        "flags (c with and without DND) by pair id.",
    )

    @property
    def has_gold(self) -> bool:
        """True when a prompt source names a gold answer column."""
        return any(p.gold_field for p in self.prompts)

    def dnd_lambda(self, iteration: int | None = None) -> float:
        """λ of the given (default: current) iteration; 0 when DND is off."""
        i = self.iteration if iteration is None else iteration
        if not self.dnd or i < 1:
            return 0.0
        return self.dnd_lambdas[min(i, len(self.dnd_lambdas)) - 1]


class RobustFTFields(_Strict):
    """Column names of an SFT row for RobustFT."""

    question: str = Field("question", description="Column holding the question.")
    answer: str = Field(
        "answer", description="Column holding the (possibly noisy) answer label."
    )
    options: str | None = Field(
        "options",
        description="Column with a list of options (multiple choice; labels are a "
        "letter or an option's text); rows without it are numeric or free-text.",
    )


class RobustFTConfig(_Strict):
    """RobustFT: detection, relabelling and selection (docs/methods.md#robustft)."""

    experts: list[str] = Field(
        default_factory=list,
        description="Local model paths that vote in detection; empty = the base model.",
    )
    answer_type: Literal["auto", "choice", "number", "text"] = Field(
        "auto",
        description="How answers are compared; auto: choice with options, number "
        "when the label is a number, text otherwise.",
    )
    agreement: Literal["all", "majority", "any"] = Field(
        "all", description="Clean when all (paper) / most / any predictions agree."
    )
    reasoning: bool = Field(True, description="Also ask a reasoning-enhanced expert.")
    k: int = Field(3, ge=1, description="Clean neighbours retrieved per noisy row.")
    review: Literal["model", "rule"] = Field(
        "model",
        description="Pseudo-label from the model's review of the reasoning- and "
        "context-enhanced answers (paper), or from a fixed agreement rule.",
    )
    select_ratio: float = Field(
        0.5, gt=0.0, le=1.0, description="β: lowest-entropy fraction kept."
    )
    encoder: str | None = Field(
        None, description="sentence-transformers path; None = all-MiniLM-L6-v2."
    )
    encoder_batch_size: int = Field(64, ge=1, description="Questions per embed batch.")
    number_rel_tol: float = Field(
        1e-2, ge=0.0, description="Relative tolerance of numeric answers."
    )
    max_new_tokens: int = Field(
        256, ge=1, description="Generation budget of the reasoning-enhanced answer."
    )
    answer_max_new_tokens: int = Field(
        64,
        ge=1,
        description="Budget of the direct answers (plain, context-enhanced, review).",
    )
    batch_size: int = Field(
        8, ge=1, description="Rows per generation batch (and per output shard)."
    )
    gold_field: str | None = Field(
        None, description="Ground-truth column for precision/recall in the report."
    )
    output_dir: str | None = Field(
        None,
        description="Parent of the denoised sets (one keyed folder per input); "
        "default <output_dir>/robustft.",
    )
    fields: RobustFTFields = Field(default_factory=RobustFTFields)
    # Expert options beyond the paper (docs/robustft.md, "Beyond the paper").
    expert_scoring: Literal["generate", "loglik"] = Field(
        "generate",
        description="generate (paper): the plain prediction ŷ is the letter the "
        "expert generates; loglik: for multiple-choice rows ŷ is the option whose "
        "text has the highest summed token log-likelihood (no length "
        "normalisation) as the assistant reply to the question with its lettered "
        "options; other rows fall back to generation (counted in the report).",
    )
    expert_training: Literal["none", "crossfit"] = Field(
        "none",
        description="crossfit: one more expert, a LoRA of the base model trained "
        "on the noisy labels of the other folds (k-fold cross-fitting) that scores "
        "each held-out row by option log-likelihood (out-of-fold probabilities); "
        "needs multiple-choice rows.",
    )
    crossfit_folds: int = Field(3, ge=2, description="k of the cross-fitting.")
    crossfit_epochs: float = Field(
        2.0, gt=0.0, description="Epochs of each fold's LoRA SFT."
    )
    crossfit_learning_rate: float = Field(
        2e-4, gt=0.0, description="AdamW learning rate of each fold's LoRA."
    )
    crossfit_lora_r: int = Field(16, ge=1, description="LoRA rank (alpha = 2r).")
    crossfit_batch_size: int = Field(
        8, ge=1, description="Rows per training step of each fold's LoRA."
    )
    seed: int = Field(42, description="Seed of the fold split and LoRA training.")
    detection: Literal["agreement", "cleanlab"] = Field(
        "agreement",
        description="agreement (paper): clean when the predictions agree with the "
        "label; cleanlab: noisy = cleanlab.filter.find_label_issues(labels, "
        "option probabilities) (needs expert_scoring: loglik or expert_training: "
        "crossfit).",
    )
    selection: Literal["entropy", "quota"] = Field(
        "entropy",
        description="entropy (paper): the ceil(β·n) lowest-H relabelled rows; quota: "
        "the same total split per label in proportion to the input labels "
        "(largest remainder, capped by what each label has), lowest H within each.",
    )
    relabel: bool = Field(
        True,
        description="true (paper): relabel the rows detection flags from retrieved "
        "clean examples, review them and keep the confident ones; false: drop every "
        "flagged row and train on the rows detection confirms, as labelled (no "
        "relabel or review stage). For when an expert detects noise well but the "
        "base model cannot label the task.",
    )

    @model_validator(mode="after")
    def _check_detection(self) -> RobustFTConfig:
        if (
            self.detection == "cleanlab"
            and self.expert_scoring != "loglik"
            and self.expert_training != "crossfit"
        ):
            raise ValueError(
                "detection: cleanlab needs option probabilities: set "
                "prefalign.robustft.expert_scoring: loglik or "
                "prefalign.robustft.expert_training: crossfit"
            )
        return self


class PrefAlignConfig(_Strict):
    """Everything under `prefalign:`."""

    loss: LossType | None = Field(
        None, description="Preference loss for `rl: dpo`; set = our trainer is used."
    )
    fused_logprobs: bool = Field(
        False, description="Use our DPO trainer with the chunked log-prob path."
    )
    chunk_size: int | None = Field(
        None,
        ge=1,
        description="Tokens per lm_head chunk; None: 512 where the vocabulary is "
        "tiled (the CPU), else from the vocabulary (chunk × V ≤ 2^25: 256 at "
        "V = 128256).",
    )
    vocab_tile: int | None = Field(
        None,
        ge=1,
        description="Vocabulary columns per lm_head block (online log-sum-exp over "
        "the tiles); None: 2048 on the CPU, the whole vocabulary on CUDA.",
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="ε for cdpo / robust."
    )
    packing: bool = Field(
        False,
        description="Pack chosen and rejected sequences into one row without padding "
        "(position ids restart per sequence; varlen flash-attention on GPU, a "
        "block-diagonal mask with sdpa/eager).",
    )
    reference_cache: bool = Field(
        False,
        description="Compute reference log-probs once per dataset (cached by the "
        "dataset fingerprint and the model) and reuse them every epoch.",
    )
    on_bad_row: BadRowPolicy = Field(
        "error", description="error: stop naming file/row/field; skip: drop and count."
    )
    spa: SpaConfig = Field(default_factory=SpaConfig)
    contrast: ContrastConfig = Field(default_factory=ContrastConfig)
    robustft: RobustFTConfig = Field(default_factory=RobustFTConfig)

    @model_validator(mode="after")
    def _check_loss_params(self) -> PrefAlignConfig:
        if self.label_smoothing > 0 and self.loss not in (None, "cdpo", "robust"):
            raise ValueError(
                "prefalign.label_smoothing only applies to loss: cdpo or robust "
                f"(loss is {self.loss!r})"
            )
        if self.reference_cache and self.loss == "spa" and self.spa.dnd:
            raise ValueError(
                "prefalign.reference_cache saves nothing with SPA's de-coupled noise "
                "detection (it needs the reference logits every step); set "
                "prefalign.reference_cache: false or prefalign.spa.dnd: false"
            )
        return self

    @property
    def trainer_active(self) -> bool:
        """True when the YAML asks for our DPO trainer."""
        return self.loss is not None or self.fused_logprobs

    @classmethod
    def from_raw(cls, raw: Any) -> PrefAlignConfig:
        """Validate a raw `prefalign:` mapping with errors that name the bad key."""
        if raw is None:
            return cls()
        if isinstance(raw, PrefAlignConfig):
            return raw
        if isinstance(raw, BaseModel):
            raw = raw.model_dump()
        if not isinstance(raw, dict):
            raise PrefAlignConfigError(
                f"prefalign: must be a mapping, got {type(raw).__name__}"
            )
        try:
            return cls.model_validate(dict(raw))
        except ValidationError as err:
            raise PrefAlignConfigError(_explain(err)) from None


class PrefAlignConfigError(ValueError):
    """A `prefalign:` block that does not validate."""


def _model_at(path: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] | None = PrefAlignConfig
    for part in path:
        if model is None or not isinstance(part, str):
            return None
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"])
        dotted = ".".join(["prefalign", *map(str, loc)])
        if e["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            valid = sorted(parent.model_fields) if parent else []
            hint = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            msg = f"unknown key {dotted!r}"
            if hint:
                msg += f" (did you mean {hint[0]!r}?)"
            msg += f"; valid keys here: {', '.join(valid)}"
            lines.append(msg)
        else:
            lines.append(f"{dotted}: {e['msg']}")
    return "invalid prefalign: block: " + "; ".join(lines)


def prefalign_config(cfg: Any) -> PrefAlignConfig:
    """The validated `prefalign:` block of a framework config (a raw or validated
    mapping with a `prefalign` key; Axolotl's YAML or our LLaMA-Factory launcher's)."""
    raw = cfg.get("prefalign") if hasattr(cfg, "get") else None
    return PrefAlignConfig.from_raw(raw)
