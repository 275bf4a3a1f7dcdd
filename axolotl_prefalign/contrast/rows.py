"""Preference rows for the contrast format: read, checked and named when bad.

A row gives the question as `prompt` text or as a chat message list (`messages`,
last user message = the question), the chosen and rejected answers as text or as
TRL's `[{"role": "assistant", ...}]`, and optionally an instruction and a system
prompt. A bad row raises `RowProblem` with the field and what is wrong; callers
add the file and row number (`core.rows.BadRowError`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..core.config import ContrastFields
from ..core.rows import text_problem


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


def parse_messages(
    value: Any, fld: str
) -> tuple[str, tuple[tuple[str, str], ...], Any]:
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
        question, context, msg_system = parse_messages(prompt, prompt_field)
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
