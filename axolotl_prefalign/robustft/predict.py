"""Prompts and predictors for RobustFT, and the resumable batch loop they run in.

A predictor is any callable `predictor(prompts, *, max_new_tokens, logprobs)` that
returns one reply per prompt, as text or as a `Generation` (needed where the
entropy is used). `ModelPredictor` wraps a local HF model with
`generation.generate`, greedy; tests pass plain functions with fixed replies.

The prompts follow the official RobustFT templates (luo-junyu/RobustFT, common.py).
As in that code, the reasoning-enhanced prediction is ONE generation whose prompt asks
for step-by-step reasoning and a reflection before the final answer; the paper
describes iterating reasoning and reflection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from datasets import Dataset
from tqdm.auto import tqdm

from ..core.generation import Generation, Prompt
from ..core.shards import ShardWriter
from .answers import letters
from .loglik import best_option, option_probs

LOG = logging.getLogger("axolotl_prefalign")

QUESTION_TYPES = {
    "choice": "multiple-choice",
    "number": "numerical",
    "text": "short-answer",
}
ANSWER_HINTS = {
    "choice": 'Put only the letter of the correct option after "Answer: ".',
    "number": 'Put only the number after "Answer: ".',
    "text": 'Put only the short answer after "Answer: ".',
}
ANSWER_LINE = 'Your answer must be on a new line starting with exactly "Answer: ".'

PLAIN_TEMPLATE = """\
Answer the following {question_type} question directly. {answer_line} {hint}

{question_block}"""

REASONING_TEMPLATE = """\
Answer the following {question_type} question.

IMPORTANT:
1. Reason step by step, then reflect on your reasoning and correct it if needed.
2. Your final answer must be on a new line starting with exactly "Answer: ". {hint}
3. Keep your reasoning clear and concise.

{question_block}"""

CONTEXT_TEMPLATE = """\
Here are some examples of questions and their answers.

{examples}
Answer the following {question_type} question. {answer_line} {hint}

{question_block}"""

REVIEW_TEMPLATE = """\
You are a review expert who decides the final answer of {question_type} questions.

{question_block}
1. Reasoning-enhanced prediction:
{reasoning}

2. Context-enhanced prediction:
{context}

Give the final answer directly. {answer_line} {hint}"""


class Predictor(Protocol):
    """One reply (text or `Generation`) per prompt."""

    def __call__(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int,
        logprobs: bool = False,
    ) -> Sequence[str | Generation]: ...


def question_block(question: str, options: Sequence[str] | None) -> str:
    """The question (and its lettered options) as the prompts show it."""
    text = f"Question:\n{question.strip()}\n"
    if options:
        lines = "\n".join(
            f"{letter}. {opt}"
            for letter, opt in zip(letters(len(options)), options, strict=True)
        )
        text += f"\nOptions:\n{lines}\n"
    return text


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _common(row: Mapping[str, Any]) -> dict[str, str]:
    kind = row["kind"]
    return {
        "question_type": QUESTION_TYPES[kind],
        "hint": ANSWER_HINTS[kind],
        "answer_line": ANSWER_LINE,
        "question_block": question_block(row["question"], row.get("options")),
    }


def plain_prompt(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """The vanilla prediction ŷ: answer directly."""
    return _user(PLAIN_TEMPLATE.format(**_common(row)))


def reasoning_prompt(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """The reasoning-enhanced prediction ŷ_r: reason, reflect, then answer."""
    return _user(REASONING_TEMPLATE.format(**_common(row)))


def context_prompt(
    row: Mapping[str, Any], examples: Sequence[Mapping[str, Any]]
) -> list[dict[str, str]]:
    """The context-enhanced prediction ŷ_c: clean neighbours as worked examples."""
    shots = "".join(
        f"Example {i + 1}:\n"
        f"{question_block(ex['question'], ex.get('options'))}Answer: {ex['label']}\n\n"
        for i, ex in enumerate(examples)
    )
    return _user(CONTEXT_TEMPLATE.format(examples=shots, **_common(row)))


def review_prompt(
    row: Mapping[str, Any], reasoning_text: str, context_text: str
) -> list[dict[str, str]]:
    """The review agent's prompt: decide from ŷ_r and ŷ_c."""
    return _user(
        REVIEW_TEMPLATE.format(
            reasoning=reasoning_text.strip() or "(no prediction)",
            context=context_text.strip() or "(no prediction)",
            **_common(row),
        )
    )


def as_generation(reply: str | Generation) -> Generation:
    """A predictor's reply as a `Generation` (plain text has no log-probs)."""
    if isinstance(reply, Generation):
        return reply
    if isinstance(reply, str):
        return Generation(text=reply, token_ids=[], token_logprobs=[])
    raise TypeError(f"a predictor must return str or Generation, got {type(reply)}")


def call_predictor(
    predictor: Predictor,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int,
    logprobs: bool = False,
) -> list[Generation]:
    """Run a predictor and check it answered every prompt."""
    replies = list(predictor(prompts, max_new_tokens=max_new_tokens, logprobs=logprobs))
    if len(replies) != len(prompts):
        raise RuntimeError(
            f"predictor returned {len(replies)} replies for {len(prompts)} prompts"
        )
    return [as_generation(r) for r in replies]


class Scorer(Protocol):
    """Summed log-likelihood of each reply as the assistant turn after its user
    prompt (`loglik.reply_logliks`); `expert_scoring: loglik` and cross-fitting."""

    def __call__(
        self, prompts: Sequence[str], replies: Sequence[str]
    ) -> Sequence[float]: ...


class ModelPredictor:
    """Greedy replies from a local HF causal LM via `generation.generate`; its
    `reply_logliks` scores given replies instead (a `Scorer`)."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int, name: str):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.name = batch_size, name

    def __call__(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int,
        logprobs: bool = False,
    ) -> list[Generation]:
        from ..core.generation import generate

        out = generate(
            self.model,
            self.tokenizer,
            list(prompts),
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            batch_size=self.batch_size,
            return_logprobs=logprobs,
            desc=f"generating ({self.name})",
        )
        return [gens[0] for gens in out]

    def reply_logliks(
        self, prompts: Sequence[str], replies: Sequence[str]
    ) -> list[float]:
        """Σ log p(reply | prompt) per pair (see `loglik`)."""
        from .loglik import reply_logliks

        return reply_logliks(
            self.model, self.tokenizer, prompts, replies, batch_size=self.batch_size
        )


def load_model_predictor(
    path: str, *, batch_size: int, load_in_4bit: bool = False
) -> ModelPredictor:
    """Load a local model (GPU when there is one) as a greedy predictor."""
    model, tokenizer = load_model(path, load_in_4bit=load_in_4bit)
    return ModelPredictor(model, tokenizer, batch_size=batch_size, name=path)


def load_model(path: str, *, load_in_4bit: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) of a local folder: bf16/fp16 on the GPU, fp32 on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    if torch.cuda.is_available():
        kwargs["dtype"] = (
            torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        )
        kwargs["device_map"] = {"": 0}
        if load_in_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=kwargs["dtype"],
            )
    else:
        kwargs["dtype"] = torch.float32
    LOG.info("robustft: loading %s for generation", path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model, tokenizer


def run_in_shards(
    rows: Dataset,
    step: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
    *,
    batch_size: int,
    writer: ShardWriter | None = None,
    desc: str = "rows",
) -> Dataset:
    """Apply `step` batch by batch; with a writer each batch is one shard and rows
    already written are skipped, so an interrupted run resumes where it stopped."""
    done = writer.done_indices() if writer is not None else set()
    out: list[dict[str, Any]] = list(writer.rows()) if writer is not None else []
    items = list(rows)
    pending = sum(1 for r in items if r["idx"] not in done)
    if done:
        LOG.info("%s: %d row(s) already done, %d to go", desc, len(done), pending)
    with tqdm(total=len(items), initial=len(items) - pending, desc=desc) as bar:
        # Batches are cut from the full row list, not the pending part, so a
        # resumed run sees exactly the batches an uninterrupted one would.
        for start in range(0, len(items), batch_size):
            batch = [
                r for r in items[start : start + batch_size] if r["idx"] not in done
            ]
            if not batch:
                continue
            results = step(batch)
            if writer is not None:
                writer.write(results, [r["idx"] for r in batch])
            out.extend(results)
            bar.update(len(batch))
    if writer is not None and not writer.complete:
        writer.finish({"rows": len(out)})
    out.sort(key=lambda r: r["idx"])
    return Dataset.from_list(out) if out else Dataset.from_dict({"idx": []})


def option_logliks(
    rows: Sequence[Mapping[str, Any]], scorer: Scorer
) -> list[list[float]]:
    """Each option's summed log-likelihood as the reply to its row's question
    (one scorer call for all options of all rows)."""
    from .sft import user_turn

    prompts, replies = [], []
    for r in rows:
        turn = user_turn(r["question"], r["options"])
        prompts += [turn] * len(r["options"])
        replies += list(r["options"])
    scores = [float(x) for x in scorer(prompts, replies)]
    if len(scores) != len(prompts):
        raise RuntimeError(
            f"scorer returned {len(scores)} log-likelihoods for {len(prompts)} replies"
        )
    out, start = [], 0
    for r in rows:
        out.append(scores[start : start + len(r["options"])])
        start += len(r["options"])
    return out


def scored_row(idx: int, logliks: Sequence[float]) -> dict[str, Any]:
    """A row's option log-likelihoods, their softmax and the predicted letter."""
    return {
        "idx": idx,
        "option_logliks": [round(x, 6) for x in logliks],
        "option_probs": option_probs(logliks),
        "loglik_answer": letters(len(logliks))[best_option(logliks)],
    }


def predict_rows(
    rows: Dataset,
    predictor: Predictor,
    *,
    reasoning: bool,
    max_new_tokens: int,
    answer_max_new_tokens: int,
    batch_size: int,
    writer: ShardWriter | None = None,
    desc: str = "predict",
    scorer: Scorer | None = None,
) -> Dataset:
    """Stage 1: the plain (and reasoning-enhanced) reply of one expert per row.

    With a `scorer` (expert_scoring: loglik) the plain prediction of a
    multiple-choice row is its best option by log-likelihood (columns
    option_logliks, option_probs, loglik_answer; `plain` is None); other rows
    are still generated. The reasoning-enhanced reply (reasoning: true) is
    generated either way.
    """

    def step(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        scored: dict[int, dict[str, Any]] = {}
        if scorer is not None:
            choice = [r for r in batch if r["kind"] == "choice"]
            if choice:
                for r, ll in zip(choice, option_logliks(choice, scorer), strict=True):
                    scored[r["idx"]] = scored_row(r["idx"], ll)
        generate = [r for r in batch if r["idx"] not in scored]
        replies = (
            call_predictor(
                predictor,
                [plain_prompt(r) for r in generate],
                max_new_tokens=answer_max_new_tokens,
            )
            if generate
            else []
        )
        by_idx = {r["idx"]: g for r, g in zip(generate, replies, strict=True)}
        plain = [by_idx.get(r["idx"]) for r in batch]
        if reasoning:
            reasoned = call_predictor(
                predictor,
                [reasoning_prompt(r) for r in batch],
                max_new_tokens=max_new_tokens,
            )
        else:
            reasoned = [None] * len(batch)
        out = []
        for r, p, g in zip(batch, plain, reasoned, strict=True):
            row = {
                "idx": r["idx"],
                "plain": p.text if p is not None else None,
                "reasoning": g.text if g is not None else None,
            }
            if scorer is not None:
                empty = {"option_logliks": None, "option_probs": None}
                row.update(scored.get(r["idx"], {**empty, "loglik_answer": None}))
            out.append(row)
        return out

    return run_in_shards(rows, step, batch_size=batch_size, writer=writer, desc=desc)
