"""A LLaMA-Factory config read as `llamafactory-cli train CONFIG key=value` reads it.

LLaMA-Factory's `read_args` loads the file with OmegaConf and merges the
`key=value` arguments after it with `OmegaConf.from_cli`; this makes the same
calls, so a config means the same here as there: `learning_rate: 5e-6` is a float
(YAML 1.2; PyYAML would read the string '5e-6'), a dotted key reaches a nested
block (`prefalign.loss=ipo`), an override's value is typed as YAML
(`max_steps=3` is an int). A `.json` config is read as JSON (0.9.5's own JSON
branch hands `json.load` a path and fails).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SUFFIXES = (".yaml", ".yml", ".json")
OVERRIDE_HELP = "write key=value, as with llamafactory-cli (learning_rate=1e-5)"


class ConfigFileError(ValueError):
    """A config file or override that cannot be read; names file, line and fix."""


def read_args(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The config at `path` merged with `overrides`, as LLaMA-Factory reads them."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ConfigFileError(
            f"{path}: a LLaMA-Factory config is a {', '.join(SUFFIXES)} file"
        )
    config = _load(path)
    if not isinstance(config, DictConfig):
        raise ConfigFileError(f"{path}: a LLaMA-Factory config must be a mapping")
    for item in overrides:
        if "=" not in item or item.startswith(("=", "-")):
            raise ConfigFileError(f"override {item!r}: {OVERRIDE_HELP}")
    try:
        merged = OmegaConf.merge(config, OmegaConf.from_cli(list(overrides)))
    except (OmegaConfBaseException, ValueError) as err:
        raise ConfigFileError(
            f"overrides {' '.join(overrides)} do not apply to {path}: {err}"
        ) from None
    return OmegaConf.to_container(merged)


def _load(path: Path) -> Any:
    """The file as an OmegaConf node; syntax errors name the 1-based line."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ...core.text_files import DataFileError, read_text

    if not path.is_file():
        raise ConfigFileError(f"{path}: no such config file")
    try:
        # Decoded as every other file of ours (a byte-order mark, UTF-16, CRLF);
        # LLaMA-Factory opens it as UTF-8, which is the common case of this.
        text = read_text(path)
    except DataFileError as err:
        raise ConfigFileError(str(err)) from None
    if path.suffix == ".json":
        try:
            return OmegaConf.create(json.loads(text))
        except json.JSONDecodeError as err:
            raise ConfigFileError(
                f"{path}, line {err.lineno}: malformed JSON ({err.msg})"
            ) from None
    try:
        return OmegaConf.create(text)  # OmegaConf.load's YAML loader, on the text
    except yaml.YAMLError as err:
        raise ConfigFileError(f"{path}{_yaml_problem(err)}") from None
    except (OmegaConfBaseException, ValueError) as err:
        raise ConfigFileError(f"{path}: {err}") from None


def _yaml_problem(err: Exception) -> str:
    """', line N: malformed YAML (what; where it began)' of a PyYAML error."""
    mark = getattr(err, "problem_mark", None)
    where = f", line {mark.line + 1}" if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err)
    context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and start is not None:
        problem += f"; {context} on line {start.line + 1}"
    return f"{where}: malformed YAML ({problem})"
