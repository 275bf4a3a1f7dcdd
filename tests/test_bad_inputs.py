"""Fault injection over every input path: one clear line, or a counted skip.

Every path gets the same classes of broken input (missing field, empty, non-text,
a column of mixed types, chosen == rejected, NaN / out-of-range numbers, a malformed
line, an empty file, over-long rows, duplicate prompts across SPA iterations). The
error names the file, its 1-based line and the field; under `on_bad_row: skip` the
row is dropped and counted, and every other row is kept. Nothing may hang: worker
failures and `axolotl preprocess` run in subprocesses with a time bound.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import offline_subprocess_env, run_axolotl, tiny_train_cfg

from axolotl_prefalign.contrast import RowProblem
from axolotl_prefalign.core.config import PrefAlignConfig, SpaConfig, SpaPromptSource
from axolotl_prefalign.core.local_data import DataFileError, read_local
from axolotl_prefalign.core.rows import BadRowError
from axolotl_prefalign.integrations.axolotl.dataset_check import precheck_entry

CONTRAST = "axolotl_prefalign.contrast"
SPA_PAIRS = "axolotl_prefalign.spa_pairs"
ROBUSTFT = "axolotl_prefalign.robustft"

PAIR = {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"}
MC = {"question": "Capital of France?", "options": ["Lyon", "Paris"], "answer": "B"}
PROMPT = {"prompt": "Capital of France?"}
GOOD = {"pairs": PAIR, "mc": MC, "prompt": PROMPT}


def _run_pairs_type(type_name):
    def run(path: Path, policy: str) -> int:
        pa = PrefAlignConfig(on_bad_row=policy)
        entry = {"path": str(path), "type": type_name}
        kept, _ = precheck_entry(entry, pa)
        if policy == "skip":
            # Training reads the checked copy: exactly the rows reported as kept.
            assert len(read_local(entry["path"]).rows) == kept
        return kept

    return run


def _run_spa_prompts(path: Path, policy: str) -> int:
    from axolotl_prefalign.spa.loop import load_prompts

    return len(load_prompts(SpaPromptSource(path=str(path)), policy))


def _run_robustft_denoise_input(path: Path, policy: str) -> int:
    # `axolotl prefalign denoise` reads its input through load_input, then checks
    # every row with the pipeline's own prepare_rows.
    from axolotl_prefalign.robustft import pipeline as P

    data = P.load_input({"path": str(path)}, policy)
    rows, _ = P.prepare_rows(
        data.rows, PrefAlignConfig().robustft, data.checker(policy)
    )
    return len(rows)


def _run_export_seed(path: Path, policy: str) -> int:
    from axolotl_prefalign.integrations.llamafactory.export import export_spa

    pa = PrefAlignConfig(on_bad_row=policy)
    cfg = {"datasets": [{"path": str(path), "type": SPA_PAIRS}]}
    (seed,) = export_spa(cfg, pa)
    return len(seed.rows)


# path name -> (runner, kind of good row, main text field)
PATHS = {
    "contrast rows": (_run_pairs_type(CONTRAST), "pairs", "chosen"),
    "spa_pairs rows": (_run_pairs_type(SPA_PAIRS), "pairs", "chosen"),
    "robustft rows (dataset type)": (_run_pairs_type(ROBUSTFT), "mc", "question"),
    "robustft input (denoise)": (_run_robustft_denoise_input, "mc", "question"),
    "SPA prompt file": (_run_spa_prompts, "prompt", "prompt"),
    "export input (SPA seed)": (_run_export_seed, "pairs", "chosen"),
}


def _line(kind: str, **change) -> str:
    row = {**GOOD[kind], **change}
    for key in [k for k, v in change.items() if v is _DROP]:
        del row[key]
    return json.dumps(row)


_DROP = object()

# class -> (how the broken line reads, given kind and field; expected message)
CLASSES = {
    "missing field": (lambda k, f: _line(k, **{f: _DROP}), "field '{f}': missing"),
    "empty": (lambda k, f: _line(k, **{f: "   "}), "field '{f}': empty"),
    "non-text": (
        lambda k, f: _line(k, **{f: 42}),
        "field '{f}': must be text, got int",
    ),
    "list instead of text": (
        lambda k, f: _line(k, **{f: ["a", "b"]}),
        "field '{f}': must be text, got list",
    ),
    "malformed line": (
        lambda k, f: _line(k)[:-9],
        r"malformed JSON \(",
    ),
    "not an object": (
        lambda k, f: '["a", "list"]',
        "must be a JSON object, got a list",
    ),
    "NaN value": (
        lambda k, f: _line(k)[:-1] + ', "score": NaN}',
        "holds NaN or Infinity",
    ),
}


def _write(path: Path, kind: str, broken: str) -> Path:
    # The broken row is on line 4 (after a good row and a blank line), so a
    # message that counted rows instead of lines, or 0-based, would say 2 or 1.
    good = _line(kind)
    path.write_text(f"{good}\n\n{good}\n{broken}\n{good}\n")
    return path


@pytest.mark.parametrize("case", list(CLASSES))
@pytest.mark.parametrize("path_name", list(PATHS))
def test_each_path_names_file_line_and_field_or_counts_the_skip(
    tmp_path, caplog, path_name, case
):
    run, kind, fld = PATHS[path_name]
    make, message = CLASSES[case]
    stem = f"in-{kind}"
    path = _write(tmp_path / f"{stem}.jsonl", kind, make(kind, fld))
    expected = rf"{stem}\.jsonl, line 4\b.*" + message.format(f=fld)
    with pytest.raises(ValueError, match=expected):
        run(path, "error")
    with caplog.at_level("WARNING", logger="axolotl_prefalign"):
        assert run(path, "skip") == 3
    assert "skipped 1 bad row(s)" in caplog.text


PAIR_ONLY = {
    "chosen == rejected": (
        {"rejected": "Paris"},
        r"field 'rejected': (chosen and rejected are )?identical",
    ),
    "chosen == rejected after whitespace": (
        {"rejected": "  Paris "},
        r"field 'rejected': (chosen and rejected are )?identical",
    ),
}


@pytest.mark.parametrize("case", list(PAIR_ONLY))
@pytest.mark.parametrize(
    "path_name", ["contrast rows", "spa_pairs rows", "export input (SPA seed)"]
)
def test_identical_answers_are_bad_rows(tmp_path, path_name, case):
    run = PATHS[path_name][0]
    change, message = PAIR_ONLY[case]
    path = _write(tmp_path / "in-pairs.jsonl", "pairs", _line("pairs", **change))
    with pytest.raises(BadRowError, match=rf"in-pairs\.jsonl, line 4, {message}"):
        run(path, "error")
    assert run(path, "skip") == 3


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1.7, r"judge_prob.*must be a number in \[0, 1\], got 1.7"),
        ("NaN", r"judge_prob.*must be a number in \[0, 1\], got 'NaN'"),
        (-0.1, r"judge_prob.*got -0.1"),
        (True, r"judge_prob.*got True"),
    ],
)
def test_spa_pairs_judge_prob_out_of_range(tmp_path, value, message):
    run = PATHS["spa_pairs rows"][0]
    path = _write(
        tmp_path / "in-pairs.jsonl", "pairs", _line("pairs", judge_prob=value)
    )
    with pytest.raises(
        BadRowError, match=rf"in-pairs\.jsonl, line 4, field '{message}"
    ):
        run(path, "error")
    assert run(path, "skip") == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"options": "Lyon, Paris"}, "field 'options': options must be a list"),
        ({"answer": "E"}, "field 'answer': answer letter 'E' is not among the 2"),
        ({"answer": ""}, "field 'answer': empty"),
        ({"options": ["Lyon", ""]}, "field 'options': option 1 must be non-empty"),
        ({"options": ["Lyon"]}, "field 'options': needs at least 2 options"),
    ],
)
def test_robustft_rows(tmp_path, change, message):
    for name in ("robustft rows (dataset type)", "robustft input (denoise)"):
        run = PATHS[name][0]
        path = _write(tmp_path / "in-mc.jsonl", "mc", _line("mc", **change))
        with pytest.raises(BadRowError, match=rf"in-mc\.jsonl, line 4, {message}"):
            run(path, "error")
        assert run(path, "skip") == 3


@pytest.mark.parametrize("path_name", list(PATHS))
def test_empty_or_missing_file_is_one_clear_error_under_both_policies(
    tmp_path, path_name
):
    run = PATHS[path_name][0]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n \n")
    for policy in ("error", "skip"):
        with pytest.raises(Exception, match=r"empty\.jsonl.*empty \(no rows\)"):
            run(empty, policy)
        with pytest.raises(Exception, match=r"nope\.jsonl does not exist"):
            run(tmp_path / "nope.jsonl", policy)


def test_a_file_of_only_bad_rows_is_an_error_even_under_skip(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{oops\n[1]\n")
    with pytest.raises(
        DataFileError, match=r"bad\.jsonl: no usable rows \(2 skipped\)"
    ):
        read_local(path, on_bad_row="skip")


def test_mixed_types_blame_the_row_that_has_them(tmp_path):
    """Row 2 has `"chosen": 42` after a text row 1: line 2 is named, not row 0."""
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(PAIR) + "\n" + json.dumps({**PAIR, "chosen": 42}) + "\n")
    with pytest.raises(
        BadRowError,
        match=r"mixed\.jsonl, line 2, field 'chosen': must be text, got int",
    ):
        _run_pairs_type(CONTRAST)(path, "error")


def test_a_json_list_file_names_its_rows(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([PAIR, {**PAIR, "chosen": ""}]))
    with pytest.raises(BadRowError, match=r"list\.json, row 2, field 'chosen': empty"):
        _run_pairs_type(SPA_PAIRS)(path, "error")
    path.write_text('[{"prompt": "a",\n "chosen": }]')
    with pytest.raises(DataFileError, match=r"list\.json, line 2: malformed JSON"):
        read_local(path)


def test_parquet_rows_are_named_by_1_based_row(tmp_path):
    from datasets import Dataset

    path = tmp_path / "pairs.parquet"
    Dataset.from_list([PAIR, {**PAIR, "rejected": "Paris"}]).to_parquet(str(path))
    with pytest.raises(BadRowError, match=r"pairs\.parquet, row 2, field 'rejected'"):
        _run_pairs_type(SPA_PAIRS)(path, "error")


def test_duplicate_prompts_across_spa_iterations_are_an_error(tmp_path):
    from axolotl_prefalign.spa.loop import SpaLoopError, iteration_prompts

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"prompt": "Capital of France?"}\n{"prompt": "2 + 2?"}\n')
    b.write_text('{"prompt": "capital of  france?"}\n')
    spa = SpaConfig(
        iterations=2,
        prompts=[SpaPromptSource(path=str(a)), SpaPromptSource(path=str(b))],
    )
    with pytest.raises(
        SpaLoopError, match=r"'capital of  france\?' is in iterations 1 and 2"
    ):
        iteration_prompts(spa)


def test_template_given_as_a_preset_name_says_to_use_preset():
    from axolotl_prefalign.core.config import PrefAlignConfigError

    with pytest.raises(PrefAlignConfigError, match=r"chosen with `preset: en`"):
        PrefAlignConfig.from_raw({"contrast": {"template": "en"}})


@pytest.mark.parametrize(
    "err",
    [
        BadRowError("f.jsonl", 3, "chosen", "missing", line=5),
        BadRowError("f.jsonl", 3, None, "malformed JSON"),
        RowProblem("rejected", "empty"),
        DataFileError("f.jsonl: the file is empty (no rows)"),
    ],
)
def test_errors_survive_pickling_as_datasets_workers_send_them(err):
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and str(back) == str(err)
    assert vars(back) == vars(err)


_WORKER_SCRIPT = textwrap.dedent(
    """
    import sys
    from datasets import Dataset
    from transformers import AutoTokenizer
    from axolotl_prefalign.integrations.axolotl.spa_pairs import spa_pairs
    cfg = {"datasets": [{"path": "pairs.jsonl"}], "prefalign": {}}
    fn, kw = spa_pairs(cfg)
    kw.pop("remove_columns")
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(8)]
    rows[6]["rejected"] = "a"
    ds = Dataset.from_list(rows)
    kw["with_indices"] = True  # the Axolotl 0.19 map: indices name the row
    ds.map(lambda b, i: fn(b, i, tokenizer=tok), num_proc=2, batch_size=2,
           remove_columns=ds.column_names, **kw)
    """
)


def test_a_bad_row_in_a_map_worker_ends_the_command_it_does_not_hang(
    tmp_path, tiny_model_dir
):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_model_dir)],
        cwd=tmp_path,
        env=offline_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert (
        "BadRowError: pairs.jsonl, row 7, field 'rejected': chosen and rejected "
        "are identical" in proc.stderr
    )


# -- over-long rows and what Axolotl keeps -----------------------------------


def _contrast_fmt(tokenizer, sequence_len, **contrast):
    from axolotl_prefalign.contrast import ContrastFormat
    from axolotl_prefalign.core.config import ContrastConfig

    return ContrastFormat(
        tokenizer,
        ContrastConfig(**contrast),
        sequence_len=sequence_len,
        source="long.jsonl",
    )


def test_over_long_positive_answer_is_a_bad_row(tiny_tokenizer):
    from datasets import Dataset

    fmt = _contrast_fmt(tiny_tokenizer, 128)
    ds = Dataset.from_list([PAIR, {**PAIR, "chosen": "Paris is nice. " * 60}])
    with pytest.raises(
        BadRowError, match=r"long\.jsonl, row 2, field 'chosen': the positive answer"
    ):
        fmt.wrap_dataset(ds)


@pytest.mark.parametrize("offset", [0, 1])
def test_shortened_rows_at_the_limit_survive_axolotls_length_filter(
    tiny_tokenizer, offset
):
    """A row we report as kept is kept: rows shortened to exactly sequence_len and
    to sequence_len - 1 pass Axolotl's own drop filter."""
    from axolotl.utils.data.utils import handle_long_seq_in_dataset
    from axolotl.utils.dict import DictDefault
    from datasets import Dataset

    fmt = _contrast_fmt(tiny_tokenizer, 10_000, positive_only_ratio=0.0)
    base = len(fmt.encode_pair(_pair(""), 0).ids)
    limit = base + 40
    # A question one word at a time until the row is just over the limit.
    words = 1
    while len(fmt.encode_pair(_pair("word " * words), 0).ids) <= limit + 30:
        words += 1
    fmt = _contrast_fmt(tiny_tokenizer, limit - offset, positive_only_ratio=0.0)
    wrapped = fmt.wrap_dataset(Dataset.from_list([_row("word " * words)]))
    assert len(wrapped) == 1 and len(wrapped[0]["input_ids"]) == limit - offset
    cfg = DictDefault({"sequence_len": limit - offset, "is_preprocess": True})
    kept = handle_long_seq_in_dataset(wrapped, limit - offset, cfg)
    assert len(kept) == 1


def _pair(question):
    from axolotl_prefalign.contrast import ContrastPair

    return ContrastPair(question + "Capital of France?", "Paris", "Lyon " * 30)


def _row(question):
    return {**PAIR, "prompt": question + "Capital of France?", "rejected": "Lyon " * 30}


# -- the Axolotl commands, as a user runs them -------------------------------


def _preprocess(cfg: dict, workdir: Path):
    return run_axolotl("preprocess", cfg, workdir, timeout=120)


@pytest.mark.slow
def test_axolotl_preprocess_of_bad_spa_pairs_exits_with_the_line(
    tmp_path, tiny_model_dir
):
    """The check's message reaches the user through `axolotl preprocess` with two
    map workers, and the command ends. Which message each broken value gets is
    checked in process above (test_spa_pairs_judge_prob_out_of_range and the
    missing/empty field tests); one subprocess shows the path end to end."""
    data = tmp_path / "pairs.jsonl"
    data.write_text(_line("pairs") + "\n" + _line("pairs", rejected=_DROP) + "\n")
    message = r"line 2, field 'rejected': missing"
    cfg = tiny_train_cfg(
        tiny_model_dir,
        tmp_path / "out",
        rl="dpo",
        chat_template="chatml",
        dataset_num_proc=2,
        prefalign={"loss": "sigmoid"},
        datasets=[{"path": str(data), "ds_type": "json", "type": SPA_PAIRS}],
    )
    proc = _preprocess(cfg, tmp_path)  # a hang fails here (timeout), not in CI
    assert proc.returncode != 0
    assert _search(rf"pairs\.jsonl, {message}", proc.stderr + proc.stdout)


@pytest.mark.slow
def test_axolotl_preprocess_keeps_a_one_row_file_shortened_to_fit(
    tmp_path, tiny_model_dir
):
    """3,000-word prompt, sequence_len 128, one row: reported kept, saved, no crash."""
    data = tmp_path / "c.jsonl"
    data.write_text(_line("pairs", prompt="word " * 3000 + "What is 2+2?") + "\n")
    cfg = tiny_train_cfg(
        tiny_model_dir,
        tmp_path / "out",
        dataset_num_proc=2,
        prefalign={"contrast": {"positive_only_ratio": 0.0}},
        datasets=[{"path": str(data), "ds_type": "json", "type": CONTRAST}],
    )
    proc = _preprocess(cfg, tmp_path)
    out = proc.stderr + proc.stdout
    assert proc.returncode == 0, out[-3000:]
    assert "rows shortened to fit sequence_len=128" in out
    from datasets import load_from_disk

    (prepared,) = [p for p in (tmp_path / "out" / "prepared").iterdir() if p.is_dir()]
    ds = load_from_disk(str(prepared))
    assert len(ds) == 1 and len(ds[0]["input_ids"]) <= 128


@pytest.mark.slow
def test_axolotl_preprocess_under_skip_trains_on_exactly_the_kept_rows(
    tmp_path, tiny_model_dir
):
    data = tmp_path / "c.jsonl"
    lines = [_line("pairs", prompt=f"Question {i}?") for i in range(5)]
    lines[2] = "{not json"
    lines[3] = _line("pairs", chosen=42)
    data.write_text("\n".join(lines) + "\n")
    cfg = tiny_train_cfg(
        tiny_model_dir,
        tmp_path / "out",
        dataset_num_proc=2,
        prefalign={"on_bad_row": "skip", "contrast": {"positive_only_ratio": 0.0}},
        datasets=[{"path": str(data), "ds_type": "json", "type": CONTRAST}],
    )
    proc = _preprocess(cfg, tmp_path)
    out = proc.stderr + proc.stdout
    assert proc.returncode == 0, out[-3000:]
    assert "3 row(s) kept, 2 skipped" in out
    from datasets import load_from_disk

    (prepared,) = [p for p in (tmp_path / "out" / "prepared").iterdir() if p.is_dir()]
    assert len(load_from_disk(str(prepared))) == 3


def _search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None
