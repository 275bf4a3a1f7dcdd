"""Plaintext contrast SFT: a preference pair as one SFT example (METHODS.md §2).

`type: axolotl_prefalign.contrast` in an Axolotl SFT config renders each pair
(x, y_w, y_l) as

    Instruction: <instruction>
    Question: <x>
    Negative answer: <y_l>
    Positive answer: <y_w><eos>

and masks the labels so that only the positive answer and its end token carry
loss. Rows are tokenized by parts (prefix | answer | end token), so the label
boundary is exact whatever the tokenizer merges across the marker, and the prefix
of a positive-only row is byte for byte what `build_inference_prompt` returns.
Spaces between a marker and its text belong to the text (" Paris" stays one BPE
token; the prompt ends on "Positive answer:" with no trailing space).
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.config import ContrastConfig, ContrastFields, PrefAlignConfig
from ..core.rows import BadRowError, RowChecker, text_problem

LOG = logging.getLogger("axolotl_prefalign")

IGNORE_INDEX = -100
TYPE_NAME = "axolotl_prefalign.contrast"
NEGATIVE_LABELS = "negative_labels"
_STATUS = "_prefalign_contrast_status"
# The source row of each rendered row, kept while the rows are put in training order.
_ROW = "_prefalign_contrast_row"

PRESETS: dict[str, dict[str, Any]] = {
    "en": {
        "parts": {
            "system": "{system}",
            "instruction": "Instruction: {instruction}",
            "turn": "{role}: {content}",
            "question": "Question: {question}",
            "negative": "Negative answer: {negative}",
            "positive": "Positive answer: {positive}",
        },
        "roles": {"system": "System", "user": "User", "assistant": "Assistant"},
        "instruction": "Answer the question accurately. A negative answer, when one "
        "is given, is an example of a wrong answer.",
    },
    "zh": {
        "parts": {
            "system": "{system}",
            "instruction": "指令：{instruction}",
            "turn": "{role}：{content}",
            "question": "问题：{question}",
            "negative": "消极回答：{negative}",
            "positive": "积极回答：{positive}",
        },
        "roles": {"system": "系统", "user": "用户", "assistant": "助手"},
        "instruction": "请准确回答问题。如果给出了消极回答，它是一个错误答案的示例。",
    },
}

# Private-use characters stand in for the row's texts while the template (or the
# model's chat template) is rendered; their positions in the result give the exact
# character spans of question, negative and positive answer.
_SENTINELS = {"question": "\ue000", "negative": "\ue001", "positive": "\ue002"}
# Spaces that go from the end of a marker to the text after it (newlines stay).
_SPACES = " \t"


class RowProblem(Exception):
    """A bad row: the field and what is wrong with it (turned into BadRowError)."""

    def __init__(self, fld: str | None, problem: str):
        super().__init__(problem)
        self.field, self.problem = fld, problem

    def __reduce__(self):
        # Rebuildable in the parent of a datasets worker (num_proc > 1).
        return (type(self), (self.field, self.problem))


@dataclass(frozen=True)
class ContrastPair:
    """One validated preference row: question, answers and optional context."""

    question: str
    positive: str
    negative: str
    instruction: str | None = None
    system: str | None = None
    context: tuple[tuple[str, str], ...] = ()


@dataclass
class Piece:
    """A span of the rendered row and what it is (an `end` without text = EOS)."""

    kind: str  # context | question | negative | positive | end
    text: str = ""


@dataclass
class EncodedRow:
    """Token ids with one kind per token, plus what truncation did to the row."""

    ids: list[int]
    kinds: list[str]
    positive_only: bool
    truncation: tuple[str, ...] = ()

    @property
    def labels(self) -> list[int]:
        """Loss on the positive answer and its end token only."""
        return [
            i if k in ("positive", "end") else IGNORE_INDEX
            for i, k in zip(self.ids, self.kinds, strict=True)
        ]

    @property
    def negative_labels(self) -> list[int]:
        """The negative answer's ids (for the unlikelihood term); -100 elsewhere."""
        return [
            i if k == "negative" else IGNORE_INDEX
            for i, k in zip(self.ids, self.kinds, strict=True)
        ]


def is_positive_only(index: int, ratio: float, seed: int) -> bool:
    """Whether row `index` is rendered without a negative slot (fixed by seed)."""
    if ratio <= 0.0:
        return False
    if ratio >= 1.0:
        return True
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < ratio


def _contrast_config(config: Any) -> ContrastConfig:
    if config is None:
        return ContrastConfig()
    if isinstance(config, ContrastConfig):
        return config
    if isinstance(config, PrefAlignConfig):
        return config.contrast
    from ..core.config import prefalign_config

    return prefalign_config(config).contrast


# ---------------------------------------------------------------------------
# Row parsing and validation


def _messages(value: Any, fld: str) -> tuple[str, tuple[tuple[str, str], ...], Any]:
    """Question (last user message), earlier turns and a leading system message."""
    if not value:
        raise RowProblem(fld, "empty message list")
    msgs = []
    for j, m in enumerate(value):
        role = m.get("role") if isinstance(m, Mapping) else None
        content = m.get("content") if isinstance(m, Mapping) else None
        if not isinstance(role, str) or not isinstance(content, str):
            raise RowProblem(fld, f"message {j} needs text 'role' and 'content'")
        msgs.append((role, content))
    system = None
    if msgs[0][0] == "system":
        system, msgs = msgs[0][1], msgs[1:]
    users = [j for j, (role, _) in enumerate(msgs) if role == "user"]
    if not users:
        raise RowProblem(fld, "has no user message (the question)")
    last = users[-1]
    if last != len(msgs) - 1:
        raise RowProblem(
            fld,
            f"must end with the user message that asks the question; got a "
            f"trailing {msgs[-1][0]!r} message",
        )
    question = msgs[last][1].strip()
    if not question:
        raise RowProblem(fld, "the last user message is empty")
    return question, tuple(msgs[:last]), system


def _answer(row: Mapping[str, Any], fld: str) -> str:
    value = row.get(fld)
    # TRL's conversational format: [{"role": "assistant", "content": ...}]
    if isinstance(value, list) and value and isinstance(value[-1], Mapping):
        if value[-1].get("role") == "assistant":
            value = value[-1].get("content")
            row = {fld: value}
    problem = text_problem(row, fld)
    if problem:
        raise RowProblem(fld, problem)
    return value.strip()


def _optional_text(row: Mapping[str, Any], fld: str) -> str | None:
    value = row.get(fld)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise RowProblem(fld, f"must be text, got {type(value).__name__}")
    return value.strip()


def parse_row(row: Mapping[str, Any], fields: ContrastFields) -> ContrastPair:
    """Validate a preference row and return its parts (raises on a bad row)."""
    context: tuple[tuple[str, str], ...] = ()
    msg_system = None
    prompt = row.get(fields.prompt)
    prompt_field = fields.prompt
    if prompt is None and row.get(fields.messages) is not None:
        prompt, prompt_field = row[fields.messages], fields.messages
    if isinstance(prompt, list):
        question, context, msg_system = _messages(prompt, prompt_field)
    else:
        problem = text_problem(row, fields.prompt)
        if problem == "missing":
            problem = f"missing (and no {fields.messages!r} message list)"
        if problem:
            raise RowProblem(fields.prompt, problem)
        question = prompt.strip()
    positive = _answer(row, fields.chosen)
    negative = _answer(row, fields.rejected)
    if positive == negative:
        raise RowProblem(fields.rejected, "identical to the chosen answer")
    instruction = _optional_text(row, fields.instruction)
    system = (
        msg_system if msg_system is not None else _optional_text(row, fields.system)
    )
    return ContrastPair(question, positive, negative, instruction, system, context)


# ---------------------------------------------------------------------------
# Rendering and tokenization


def count_rows(rows: Iterable[Mapping[str, Any]], config: Any = None) -> dict[str, int]:
    """Rows of a contrast set by how the format renders them: bad rows, rows with
    the negative answer, positive-only rows (by `positive_only_ratio`). Counted
    without tokenizing; rows shortened to fit sequence_len are in the run's log."""
    config = _contrast_config(config)
    n = bad = positive_only = 0
    for index, row in enumerate(rows):
        n += 1
        try:
            parse_row(row, config.fields)
        except RowProblem:
            bad += 1
            continue
        positive_only += is_positive_only(
            index, config.positive_only_ratio, config.seed
        )
    return {
        "rows": n,
        "bad_rows": bad,
        "contrast_rows": n - bad - positive_only,
        "positive_only_rows": positive_only,
    }


class ContrastFormat:
    """Renders and tokenizes preference rows as contrast SFT examples.

    Axolotl gets it from `load` and calls `wrap_dataset` (it is registered as a
    `DatasetWrappingStrategy`): the whole dataset is seen at once, so row indices
    are known (positive-only choice, error messages) and skipped rows are counted.
    """

    def __init__(
        self,
        tokenizer: Any,
        config: ContrastConfig | None = None,
        *,
        sequence_len: int = 2048,
        source: str = "contrast dataset",
        on_bad_row: str = "error",
        order_rows: Callable[[Any, list[int]], list[int]] | None = None,
    ):
        self.tokenizer = tokenizer
        # (raw dataset, source rows of the rendered rows) -> their training order
        # as positions in the rendered rows; None keeps file order.
        self.order_rows = order_rows
        self.config = config or ContrastConfig()
        self.sequence_len = sequence_len
        self.source = source
        self.on_bad_row = on_bad_row
        RowChecker(source, on_bad_row)  # validates the policy name
        preset = PRESETS[self.config.preset]
        self.parts = {**preset["parts"], **(self.config.template or {})}
        self.roles = preset["roles"]
        self.default_instruction = (
            preset["instruction"]
            if self.config.instruction is None
            else self.config.instruction
        )
        self.bos_text = ""
        if tokenizer is None:
            return
        if self.config.mode == "chat":
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError(
                    "prefalign.contrast.mode: chat needs a tokenizer with a chat "
                    "template (set `chat_template:` in the YAML, or use mode: raw)"
                )
        else:
            if tokenizer.eos_token_id is None:
                raise ValueError(
                    "prefalign.contrast.mode: raw ends the positive answer with the "
                    "EOS token, but the tokenizer has none (set "
                    "special_tokens.eos_token)"
                )
            # Raw text carries the BOS the tokenizer would add, as text, so that the
            # prompt string alone (tokenized without special tokens, as generation
            # does) reproduces the training prefix.
            bos = tokenizer.bos_token_id
            with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
            if bos is not None and with_special[:1] == [bos]:
                self.bos_text = tokenizer.bos_token

    # -- rendering ---------------------------------------------------------

    def _fill(self, key: str, **values: str) -> str:
        return self.parts[key].format(**values)

    def _role(self, role: str) -> str:
        return self.roles.get(role, role.capitalize())

    def render(self, pair: ContrastPair, positive_only: bool) -> list[Piece]:
        """The row as pieces of text; question/answers are separate pieces."""
        s = _SENTINELS
        instruction = (
            pair.instruction
            if pair.instruction is not None
            else self.default_instruction
        )
        head = []
        if instruction:
            head.append(self._fill("instruction", instruction=instruction))
        question = self._fill("question", question=s["question"])
        negative = (
            None if positive_only else self._fill("negative", negative=s["negative"])
        )
        positive = self._fill("positive", positive=s["positive"])
        neg_first = self.config.order == "negative_first"
        if self.config.mode == "raw":
            lines = [self._fill("system", system=pair.system)] if pair.system else []
            lines += head
            lines += [
                self._fill("turn", role=self._role(role), content=content)
                for role, content in pair.context
            ]
            lines.append(question)
            if negative and neg_first:
                lines.append(negative)
            lines.append(positive)
            if negative and not neg_first:
                lines.append(negative)
            text = self.bos_text + "\n".join(lines)
        else:
            # Chat: the contrast text up to the positive-answer marker is the user
            # turn, the positive answer is the assistant reply; a negative placed
            # after the positive one becomes a further user turn (no loss).
            marker = positive[: positive.index(s["positive"])].rstrip()
            user = head + [question]
            if negative and neg_first:
                user.append(negative)
            if marker:
                user.append(marker)
            messages = (
                [{"role": "system", "content": pair.system}] if pair.system else []
            )
            messages += [{"role": r, "content": c} for r, c in pair.context]
            messages.append({"role": "user", "content": "\n".join(user)})
            messages.append({"role": "assistant", "content": s["positive"]})
            if negative and not neg_first:
                messages.append({"role": "user", "content": negative})
            text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        values = {
            "question": pair.question,
            "negative": None if positive_only else pair.negative,
            "positive": pair.positive,
        }
        return self._split(text, values)

    def _split(self, text: str, values: Mapping[str, str | None]) -> list[Piece]:
        spans = []
        for kind, sentinel in _SENTINELS.items():
            if values[kind] is None:
                continue
            if text.count(sentinel) != 1:
                where = "chat template" if self.config.mode == "chat" else "template"
                raise ValueError(
                    f"the {where} does not put the {kind} text into the rendered row "
                    "exactly once (a chat template must insert message content "
                    "verbatim; row texts must not contain U+E000-U+E002)"
                )
            spans.append((text.index(sentinel), kind))
        pieces, pos = [], 0
        for start, kind in sorted(spans):
            # The spaces between a marker and its text go with the text: BPE
            # tokenizers merge a space into the next word (` Paris`), so the
            # answer keeps its natural first token and the prefix (the inference
            # prompt) ends on the marker, not on a trailing space. Newlines stay
            # with the marker: they do not merge forwards (Llama-3 even merges
            # `:\n` backwards), and chat templates end their headers with one.
            before = text[pos:start]
            cut = len(before.rstrip(_SPACES))
            pieces.append(Piece("context", before[:cut]))
            pieces.append(Piece(kind, before[cut:] + values[kind]))
            pos = start + 1
            if kind == "positive":
                # The end token: EOS in raw mode, the chat template's first token
                # after the answer (its end-of-turn token) in chat mode.
                # Chat: the text up to the next slot is one piece, so the template's
                # end-of-turn token is its first token; a next slot's leading
                # spaces stay for that slot (the loop above picks them up).
                rest_end = min([s for s, _ in spans if s > start] + [len(text)])
                rest = text[pos:rest_end].rstrip(_SPACES)
                # An end piece without text stands for the EOS token.
                if self.config.mode == "raw" or not rest:
                    pieces.append(Piece("end"))
                else:
                    pieces.append(Piece("end", rest))
                    pos += len(rest)
        pieces.append(Piece("context", text[pos:]))
        return [p for p in pieces if p.text or p.kind in ("positive", "end")]

    def _eos_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no EOS token to end the answer with")
        return eos

    def prompt_text(self, pair: ContrastPair) -> str:
        """The positive-only training prefix: everything before the answer."""
        out = []
        for piece in self.render(pair, positive_only=True):
            if piece.kind == "positive":
                return "".join(out)
            out.append(piece.text)
        raise AssertionError("rendered row has no positive answer")

    # -- tokenization ------------------------------------------------------

    def _encode(self, pieces: list[Piece], split_question: bool) -> list[list]:
        """[ids, kinds]: runs of context are tokenized as one text, so a
        positive-only prefix tokenizes exactly like the inference prompt."""
        units: list[Piece] = []
        for p in pieces:
            joinable = p.kind == "context" or (
                p.kind == "question" and not split_question
            )
            if joinable and units and units[-1].kind == "context":
                units[-1] = Piece("context", units[-1].text + p.text)
            elif joinable:
                units.append(Piece("context", p.text))
            else:
                units.append(p)
        ids: list[int] = []
        kinds: list[str] = []
        for u in units:
            if u.kind == "end" and not u.text:
                part = [self._eos_id()]
            elif u.text:
                part = self.tokenizer(u.text, add_special_tokens=False)["input_ids"]
            else:
                continue
            if u.kind == "end":
                # Only the first token (the end-of-turn token) carries loss.
                kinds += ["end"] + ["context"] * (len(part) - 1)
            else:
                kinds += [u.kind] * len(part)
            ids += part
        return [ids, kinds]

    def encode_pair(self, pair: ContrastPair, index: int) -> EncodedRow:
        """Tokenize a pair, shortening negative then question to fit sequence_len."""
        limit = self.sequence_len
        pos_only = is_positive_only(
            index, self.config.positive_only_ratio, self.config.seed
        )
        done: list[str] = []
        ids, kinds = self._encode(self.render(pair, pos_only), split_question=False)
        if len(ids) > limit and not pos_only:
            excess = len(ids) - limit
            negative_at = [j for j, k in enumerate(kinds) if k == "negative"]
            if excess < len(negative_at):
                # Keep the start of the negative answer.
                drop = set(negative_at[-excess:])
                ids = [t for j, t in enumerate(ids) if j not in drop]
                kinds = [k for j, k in enumerate(kinds) if j not in drop]
                done.append("negative_shortened")
            else:
                pos_only = True
                ids, kinds = self._encode(self.render(pair, True), split_question=False)
                done.append("negative_removed")
        if len(ids) > limit:
            ids, kinds = self._encode(self.render(pair, pos_only), split_question=True)
            excess = len(ids) - limit
            question_at = [j for j, k in enumerate(kinds) if k == "question"]
            if excess >= len(question_at):
                n_answer = sum(k in ("positive", "end") for k in kinds)
                rest = len(ids) - len(question_at)
                raise RowProblem(
                    self.config.fields.chosen,
                    f"the positive answer ({n_answer} tokens with its end token) "
                    f"does not fit in sequence_len={limit}: {rest} tokens remain "
                    "without the negative answer and the question",
                )
            # Keep the end of the question (where the actual ask usually is).
            drop = set(question_at[:excess])
            ids = [t for j, t in enumerate(ids) if j not in drop]
            kinds = [k for j, k in enumerate(kinds) if j not in drop]
            done.append("question_shortened")
        return EncodedRow(ids, kinds, pos_only, tuple(done))

    def encode_row(self, row: Mapping[str, Any], index: int) -> EncodedRow:
        """Validate and tokenize one raw row; a bad row raises `BadRowError`."""
        try:
            return self.encode_pair(parse_row(row, self.config.fields), index)
        except RowProblem as err:
            raise BadRowError(self.source, index, err.field, err.problem) from None

    def features(self, encoded: EncodedRow) -> dict[str, list[int]]:
        """input_ids / attention_mask / labels (+ negative_labels when used)."""
        out = {
            "input_ids": encoded.ids,
            "attention_mask": [1] * len(encoded.ids),
            "labels": encoded.labels,
        }
        if self.config.unlikelihood_weight > 0:
            out[NEGATIVE_LABELS] = encoded.negative_labels
        return out

    def tokenize_row(self, row: Mapping[str, Any], index: int) -> dict[str, list[int]]:
        """One row's training features; a bad row raises `BadRowError`."""
        return self.features(self.encode_row(row, index))

    # -- Axolotl dataset hook ------------------------------------------------

    def _map_row(self, row: Mapping[str, Any], index: int) -> dict[str, Any]:
        try:
            encoded = self.encode_pair(parse_row(row, self.config.fields), index)
        except RowProblem as err:
            empty = self.features(EncodedRow([], [], False))
            bad = f"bad\t{err.field or ''}\t{err.problem}"
            return {**empty, _STATUS: bad, _ROW: index}
        status = list(encoded.truncation) + (["positive_only"] * encoded.positive_only)
        return {**self.features(encoded), _STATUS: ",".join(status), _ROW: index}

    def wrap_dataset(
        self,
        dataset: Any,
        process_count: int | None = None,
        keep_in_memory: bool | None = False,
        **kwargs: Any,
    ) -> Any:
        """Tokenize a whole dataset; bad rows raise, or are dropped and counted."""
        from datasets import Dataset

        if not isinstance(dataset, Dataset):
            raise ValueError(
                f"{self.source}: the contrast format needs a map-style dataset "
                "(streaming datasets are not supported)"
            )
        if len(dataset) == 0:
            # map() over no rows adds no status column; say so before it fails later.
            raise ValueError(
                f"{self.source} has no rows: the contrast format needs at least one "
                "row (check the dataset path, split and any filtering)"
            )
        # Bad rows are recorded in a status column rather than raised inside map():
        # that works with num_proc > 1 and lets the error name the FIRST bad row.
        mapped = dataset.map(
            self._map_row,
            with_indices=True,
            remove_columns=dataset.column_names,
            num_proc=process_count,
            keep_in_memory=bool(keep_in_memory),
            desc="Rendering contrast rows",
        )
        statuses = mapped[_STATUS]
        bad = [(j, s) for j, s in enumerate(statuses) if s.startswith("bad\t")]
        checker = RowChecker(self.source, self.on_bad_row)
        if bad and self.on_bad_row == "error" and len(bad) > 1:
            LOG.error("%s: %d bad rows; the first one:", self.source, len(bad))
        for j, status in bad:
            _, fld, problem = status.split("\t", 2)
            checker.bad(j, fld or None, problem)
        checker.report()
        if bad:
            mapped = mapped.filter(
                lambda s: not s.startswith("bad\t"), input_columns=_STATUS
            )
        counts = Counter(
            tag
            for s in statuses
            if s and not s.startswith("bad\t")
            for tag in s.split(",")
        )
        self._log_counts(len(statuses) - len(bad), counts)
        if self.order_rows is not None:
            # After rendering: the positive-only choice and the row numbers of
            # error messages stay those of the file.
            mapped = mapped.select(self.order_rows(dataset, mapped[_ROW]))
        return mapped.remove_columns([_STATUS, _ROW])

    def _log_counts(self, n_rows: int, counts: Counter) -> None:
        if n_rows:
            LOG.info(
                "%s: %d contrast rows (%d positive-only)",
                self.source,
                n_rows,
                counts["positive_only"],
            )
        cut = {k: v for k, v in counts.items() if k != "positive_only"}
        if cut:
            LOG.warning(
                "%s: rows shortened to fit sequence_len=%d: %s",
                self.source,
                self.sequence_len,
                ", ".join(
                    f"{k.replace('_', ' ')}: {v}" for k, v in sorted(cut.items())
                ),
            )


# ---------------------------------------------------------------------------
# Inference


def build_inference_prompt(
    question: str | Sequence[Mapping[str, str]],
    *,
    tokenizer: Any = None,
    config: Any = None,
    instruction: str | None = None,
    system: str | None = None,
    context: Sequence[Mapping[str, str]] = (),
) -> str:
    """The training prefix of a positive-only row, up to the positive-answer marker.

    It ends on the marker itself ("…Positive answer:"): the space before the answer
    belongs to the answer's first token, which the model generates (" Paris").
    Tokenize the result with `add_special_tokens=False` (any BOS is in the text).
    `question` may be a chat message list (last user message = the question). Chat
    mode and the raw-mode BOS need the tokenizer.
    """
    contrast = _contrast_config(config)
    if contrast.mode == "chat" and tokenizer is None:
        raise ValueError("mode: chat renders through the tokenizer's chat template")
    fmt = ContrastFormat(tokenizer, contrast, sequence_len=sys.maxsize)
    turns = tuple((m["role"], m["content"]) for m in context)
    if not isinstance(question, str):
        try:
            question, more, msg_system = _messages(list(question), "question")
        except RowProblem as err:
            raise ValueError(f"question: {err.problem}") from None
        turns += more
        system = system if system is not None else msg_system
    pair = ContrastPair(question.strip(), "", "", instruction, system, turns)
    return fmt.prompt_text(pair)
