"""The experts of a RobustFT run: which models vote, and one loaded at a time."""

from __future__ import annotations

import gc
import re
from collections.abc import Callable
from pathlib import Path

from ..core.config import RobustFTConfig
from .errors import RobustFTError
from .predict import Predictor, Scorer, load_model_predictor

BASE_EXPERT = "base"
CROSSFIT_EXPERT = "crossfit"


def expert_list(
    settings: RobustFTConfig, base_model: str | None
) -> list[tuple[str, str]]:
    """(name, path) of the experts: the configured ones, else the base model."""
    if settings.experts:
        return [(p, p) for p in settings.experts]
    if not base_model:
        raise RobustFTError("RobustFT needs base_model (or prefalign.robustft.experts)")
    return [(BASE_EXPERT, base_model)]


def model_alias(path: str) -> str:
    """The name `resolve_model_path` knows for a path from the YAML."""
    return "default" if path == "prefalign:default" else path


def expert_slug(name: str) -> str:
    """An expert's name as a folder name (predictions/NN-<slug>)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(name.rstrip("/")).name or name)[:60]


def default_loader(
    settings: RobustFTConfig, load_in_4bit: bool
) -> Callable[[str], Predictor]:
    """Load a local HF model as a predictor (the loader tests replace)."""

    def load(path: str) -> Predictor:
        from ..core.models import resolve_model_path

        return load_model_predictor(
            resolve_model_path(model_alias(path)),
            batch_size=settings.batch_size,
            load_in_4bit=load_in_4bit,
        )

    return load


class ModelSlot:
    """Loads a model on first use and keeps one at a time (experts never share
    memory); a stage whose shards are all written never loads its model."""

    def __init__(self, load: Callable[[str], Predictor]):
        self.load = load
        self.path: str | None = None
        self.current: Predictor | None = None

    def _use(self, path: str) -> Predictor:
        if self.path != path:
            self.release()
            self.current, self.path = self.load(path), path
        return self.current

    def predictor(self, path: str) -> Predictor:
        """The replies of the model at `path`, loaded when first asked."""

        def call(prompts, **kwargs):
            return self._use(path)(prompts, **kwargs)

        return call

    def scorer(self, path: str) -> Scorer:
        """The option log-likelihoods of the model at `path` (its predictor's
        `reply_logliks`)."""

        def call(prompts, replies):
            current = self._use(path)
            score = getattr(current, "reply_logliks", None)
            if score is None:
                raise RobustFTError(
                    "expert_scoring: loglik needs a predictor with reply_logliks "
                    f"(got {type(current).__name__})"
                )
            return score(prompts, replies)

        return call

    def release(self) -> None:
        """Free the loaded model (and the CUDA cache) before the next one loads."""
        if self.current is None:
            return
        self.current = self.path = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
