"""The contrast text template: a pair rendered as text split into labelled pieces.

Raw mode writes the marker lines of a preset ("Question: …", "Negative answer: …",
"Positive answer: …"); chat mode puts the same text through the tokenizer's chat
template, the positive answer as the assistant reply. Either way the result comes
back as pieces (context | question | negative | positive | end), so the
tokenization can label every token by where it came from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..core.config import ContrastConfig
from .rows import ContrastPair

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


@dataclass
class Piece:
    """A span of the rendered row and what it is (an `end` without text = EOS)."""

    kind: str  # context | question | negative | positive | end
    text: str = ""


@dataclass
class _Slots:
    """The template's lines around the row's texts, in the order the row has them."""

    head: list[str]  # the instruction line, if any
    ask: list[str]  # the question, then a negative answer placed first
    positive: str  # the positive-answer line
    after: str | None  # a negative answer placed after the positive one


def is_positive_only(index: int, ratio: float, seed: int) -> bool:
    """Whether row `index` is rendered without a negative slot (fixed by seed)."""
    if ratio <= 0.0:
        return False
    if ratio >= 1.0:
        return True
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < ratio


class ContrastTemplate:
    """Renders a `ContrastPair` as the text of one contrast SFT example, in pieces."""

    def __init__(self, tokenizer: Any, config: ContrastConfig | None = None):
        self.tokenizer = tokenizer
        self.config = config or ContrastConfig()
        preset = PRESETS[self.config.preset]
        self.parts = {**preset["parts"], **(self.config.template or {})}
        self.roles = preset["roles"]
        self.default_instruction = (
            preset["instruction"]
            if self.config.instruction is None
            else self.config.instruction
        )
        self.bos_text = ""
        if tokenizer is not None:
            self._check_tokenizer(tokenizer)

    def _check_tokenizer(self, tokenizer: Any) -> None:
        """Fail early on a tokenizer the mode cannot render with; pick up its BOS."""
        if self.config.mode == "chat":
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError(
                    "prefalign.contrast.mode: chat needs a tokenizer with a chat "
                    "template (set `chat_template:` in the YAML, or use mode: raw)"
                )
            return
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
        negative = (
            None if positive_only else self._fill("negative", negative=s["negative"])
        )
        neg_first = self.config.order == "negative_first"
        slots = _Slots(
            head=head,
            ask=[self._fill("question", question=s["question"])]
            + ([negative] if negative and neg_first else []),
            positive=self._fill("positive", positive=s["positive"]),
            after=negative if negative and not neg_first else None,
        )
        if self.config.mode == "raw":
            text = self._raw_text(pair, slots)
        else:
            text = self._chat_text(pair, slots)
        values = {
            "question": pair.question,
            "negative": None if positive_only else pair.negative,
            "positive": pair.positive,
        }
        return self._split(text, values)

    def _raw_text(self, pair: ContrastPair, slots: _Slots) -> str:
        """The marker lines, BOS first (sentinels in place of the row's texts)."""
        lines = [self._fill("system", system=pair.system)] if pair.system else []
        lines += slots.head
        lines += [
            self._fill("turn", role=self._role(role), content=content)
            for role, content in pair.context
        ]
        lines += slots.ask + [slots.positive]
        if slots.after:
            lines.append(slots.after)
        return self.bos_text + "\n".join(lines)

    def _chat_text(self, pair: ContrastPair, slots: _Slots) -> str:
        """The chat template's text (sentinels in place of the row's texts)."""
        # The contrast text up to the positive-answer marker is the user turn, the
        # positive answer is the assistant reply; a negative placed after the
        # positive one becomes a further user turn (no loss).
        positive = slots.positive
        marker = positive[: positive.index(_SENTINELS["positive"])].rstrip()
        user = slots.head + slots.ask + ([marker] if marker else [])
        messages = [{"role": "system", "content": pair.system}] if pair.system else []
        messages += [{"role": r, "content": c} for r, c in pair.context]
        messages.append({"role": "user", "content": "\n".join(user)})
        messages.append({"role": "assistant", "content": _SENTINELS["positive"]})
        if slots.after:
            messages.append({"role": "user", "content": slots.after})
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

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

    def prompt_text(self, pair: ContrastPair) -> str:
        """The positive-only training prefix: everything before the answer."""
        out = []
        for piece in self.render(pair, positive_only=True):
            if piece.kind == "positive":
                return "".join(out)
            out.append(piece.text)
        raise AssertionError("rendered row has no positive answer")
