"""Files as users' tools write them, on every local input path.

Spreadsheet exports and editors on other systems write byte-order marks, UTF-16,
CRLF and cp1252; copies get cut off; names and contents disagree about gzip. Each
file either loads as the user meant (and whatever reads it after us — `datasets`
under Axolotl or LLaMA-Factory — gets the same rows) or ends in one line naming
the file, the 1-based line and the problem.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import json
import lzma
from pathlib import Path

import pytest

from axolotl_prefalign.core.config import PrefAlignConfig, SpaPromptSource
from axolotl_prefalign.core.local_data import DataFileError, read_local

ROWS = [
    {"prompt": "Café au lait?", "chosen": "Oui", "rejected": "Non"},
    {"prompt": "Two plus two?", "chosen": "four", "rejected": "five"},
]
JSONL = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS)
JSON = json.dumps(ROWS, ensure_ascii=False, indent=1)
CSV = "prompt,chosen,rejected\n" + "".join(
    f"{r['prompt']},{r['chosen']},{r['rejected']}\n" for r in ROWS
)
TEXT = {"jsonl": JSONL, "json": JSON, "csv": CSV}


def _crlf(text: str) -> str:
    return text.replace("\n", "\r\n")


def _cut(data: bytes) -> bytes:
    return data[: len(data) // 2]


# name -> (file name, its bytes); every one loads as ROWS.
LOADS = {
    **{
        f"UTF-8 with BOM ({k})": (f"in.{k}", codecs.BOM_UTF8 + t.encode())
        for k, t in TEXT.items()
    },
    **{
        f"UTF-16 LE with BOM ({k})": (f"in.{k}", _crlf(t).encode("utf-16"))
        for k, t in TEXT.items()
    },
    **{
        f"UTF-16 BE with BOM ({k})": (
            f"in.{k}",
            codecs.BOM_UTF16_BE + t.encode("utf-16-be"),
        )
        for k, t in TEXT.items()
    },
    **{f"CRLF ({k})": (f"in.{k}", _crlf(t).encode()) for k, t in TEXT.items()},
    "gzip (jsonl.gz)": ("in.jsonl.gz", gzip.compress(JSONL.encode())),
    "gzip under a plain name": ("in.jsonl", gzip.compress(JSONL.encode())),
    "plain text under a .gz name": ("in.jsonl.gz", JSONL.encode()),
    "gzip of UTF-8 with BOM": (
        "in.json.gz",
        gzip.compress(codecs.BOM_UTF8 + JSON.encode()),
    ),
}

_CP1252 = (
    "in.{k}, line {line}: not UTF-8 \\(byte 0xE9 at column \\d+\\).*iconv -f cp1252"
)
# name -> (file name, its bytes, the one line expected)
FAILS = {
    **{
        f"cp1252 bytes ({k})": (
            f"in.{k}",
            t.encode("cp1252"),
            _CP1252.format(k=k, line={"jsonl": 1, "json": 3, "csv": 2}[k]),
        )
        for k, t in TEXT.items()
    },
    "cp1252 bytes in a .jsonl.gz": (
        "in.jsonl.gz",
        gzip.compress(JSONL.encode("cp1252")),
        r"in\.jsonl\.gz, line 1: not UTF-8.*zcat .*in\.jsonl\.gz \| iconv -f cp1252",
    ),
    "truncated .gz": (
        "in.jsonl.gz",
        _cut(gzip.compress(JSONL.encode() * 50)),
        r"in\.jsonl\.gz, line \d+: the gzip data is damaged or cut off",
    ),
    "corrupt .gz": (
        "in.jsonl.gz",
        gzip.compress(JSONL.encode())[:12] + b"\xff" * 40,
        r"in\.jsonl\.gz, line 1: the gzip data is damaged or cut off",
    ),
    ".bz2": (
        "in.jsonl.bz2",
        bz2.compress(JSONL.encode()),
        r"in\.jsonl\.bz2: bz2-compressed files are not read \(unsupported "
        r"compression\); unpack it \(`bunzip2 -c .*in\.jsonl\.bz2 > .*in\.jsonl`\)",
    ),
    ".xz": ("in.jsonl.xz", lzma.compress(JSONL.encode()), r"xz-compressed .*`unxz -c"),
    ".zst": ("in.jsonl.zst", b"\x28\xb5\x2f\xfd" + b"\x00" * 8, r"zstd-compressed"),
    ".zip": ("in.zip", b"PK\x03\x04" + b"\x00" * 30, r"in\.zip: zip-compressed"),
    "bz2 data under a .jsonl name": (
        "in.jsonl",
        bz2.compress(JSONL.encode()),
        r"in\.jsonl: bz2-compressed .*unpacked-in\.jsonl",
    ),
    **{
        f"empty file ({k})": (
            f"in.{k}",
            b"",
            rf"in\.{k}: the file is empty \(no rows\)",
        )
        for k in ("jsonl", "json", "csv", "parquet", "arrow")
    },
    **{
        f"only blank lines ({k})": (
            f"in.{k}",
            b"\n  \r\n\t\n",
            rf"in\.{k}: the file is empty \(no rows\)",
        )
        for k in ("jsonl", "json")
    },
    "NUL bytes": (
        "in.jsonl",
        JSONL.encode().replace(b"Two", b"T\x00wo"),
        r"in\.jsonl, line 2: NUL byte at column 14: a binary or damaged file",
    ),
    "UTF-16 without a BOM": (
        "in.jsonl",
        JSONL.encode("utf-16-le"),
        r"in\.jsonl, line 1: NUL byte .*looks like UTF-16 without a byte-order "
        r"mark.*iconv -f utf-16le -t utf-8",
    ),
}


def _parquet(tmp_path: Path, kind: str) -> bytes:
    from datasets import Dataset

    ds = Dataset.from_list(ROWS * 200)
    f = tmp_path / f"whole.{kind}"
    if kind == "parquet":
        ds.to_parquet(str(f))
    else:
        ds.save_to_disk(str(tmp_path / "saved"))
        f = next((tmp_path / "saved").glob("*.arrow"))
    return f.read_bytes()


# -- the paths that read a user's file -----------------------------------------


def _read_local(path: Path) -> list:
    return read_local(path).rows


def _axolotl_entry(path: Path) -> list:
    """Axolotl's pre-check of a `type: axolotl_prefalign.contrast` entry, then the
    rows `datasets` reads from the file the entry names afterwards (as Axolotl)."""
    import datasets

    from axolotl_prefalign.integrations.axolotl.dataset_check import precheck_entry

    entry = {"path": str(path), "type": "axolotl_prefalign.contrast"}
    precheck_entry(entry, PrefAlignConfig())
    kind = entry.get("ds_type") or {"jsonl": "json", "gz": "json"}.get(
        entry["path"].rsplit(".", 1)[-1], entry["path"].rsplit(".", 1)[-1]
    )
    ds = datasets.load_dataset(kind, data_files=entry["path"], split="train")
    return ds.to_list()


def _spa_prompts(path: Path) -> list:
    from axolotl_prefalign.spa.loop import load_prompts

    prompts = load_prompts(SpaPromptSource(path=str(path)))["prompt"]
    return [{**r, "prompt": p} for r, p in zip(ROWS, prompts, strict=True)]


def _robustft_input(path: Path) -> list:
    from axolotl_prefalign.robustft.pipeline import load_input

    return load_input({"path": str(path)}).rows


def _dataset_info_entry(path: Path) -> list:
    """A LLaMA-Factory dataset_info.json entry naming the file (SPA prompts,
    RobustFT input and the export read LLaMA-Factory data this way)."""
    info = path.parent / "dataset_info.json"
    columns = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
    entry = {"file_name": path.name, "ranking": True, "columns": columns}
    info.write_text(json.dumps({"d": entry}))
    return read_local(info, name="d").rows


def _llamafactory_launch(path: Path) -> list:
    """`prefalign-llamafactory train`'s pre-check of a prefalign_pairs dataset,
    then the rows `datasets` reads from the file LLaMA-Factory is pointed at."""
    import datasets

    from axolotl_prefalign.integrations.llamafactory.launcher import precheck

    entry = {"file_name": path.name, "formatting": "prefalign_pairs"}
    (path.parent / "dataset_info.json").write_text(json.dumps({"d": entry}))
    args = {"dataset_dir": str(path.parent), "dataset": "d"}
    precheck(args, PrefAlignConfig())
    info = json.loads((Path(args["dataset_dir"]) / "dataset_info.json").read_text())
    file = Path(args["dataset_dir"]) / info["d"]["file_name"]
    kind = {".jsonl": "json", ".gz": "json"}.get(file.suffix, file.suffix[1:])
    return datasets.load_dataset(kind, data_files=str(file), split="train").to_list()


PATHS = {
    "read_local": _read_local,
    "Axolotl datasets: entry": _axolotl_entry,
    "SPA prompts": _spa_prompts,
    "RobustFT input": _robustft_input,
    "LLaMA-Factory dataset_info entry": _dataset_info_entry,
    "LLaMA-Factory launcher pre-check": _llamafactory_launch,
}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AXOLOTL_PREFALIGN_CACHE", str(tmp_path / "cache"))


# LLaMA-Factory reads `formatting: prefalign_pairs` from JSON only: no csv there.
LOAD_CASES = [
    pytest.param(path_name, case, id=f"{path_name}-{case}")
    for path_name in PATHS
    for case in LOADS
    if not (
        path_name == "LLaMA-Factory launcher pre-check"
        and LOADS[case][0].endswith(".csv")
    )
]


@pytest.mark.parametrize(("path_name", "case"), LOAD_CASES)
def test_files_load_as_the_user_meant(tmp_path, path_name, case):
    name, data = LOADS[case]
    (tmp_path / "d").mkdir()
    path = tmp_path / "d" / name
    path.write_bytes(data)
    assert PATHS[path_name](path) == ROWS


@pytest.mark.parametrize("case", list(FAILS))
@pytest.mark.parametrize("path_name", list(PATHS))
def test_broken_files_end_in_one_line_naming_file_and_line(tmp_path, path_name, case):
    name, data, message = FAILS[case]
    (tmp_path / "d").mkdir()
    path = tmp_path / "d" / name
    path.write_bytes(data)
    with pytest.raises(Exception, match=message) as info:
        PATHS[path_name](path)
    assert "\n" not in str(info.value)
    assert not isinstance(info.value, UnicodeError)


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
@pytest.mark.parametrize("path_name", ["read_local", "Axolotl datasets: entry"])
def test_a_truncated_table_file_names_the_file(tmp_path, path_name, kind):
    path = tmp_path / f"in.{kind}"
    path.write_bytes(_cut(_parquet(tmp_path, kind)))
    with pytest.raises(DataFileError, match=rf"in\.{kind}: not a readable {kind} file"):
        PATHS[path_name](path)


def test_a_folder_named_as_a_data_file_is_one_line(tmp_path):
    (tmp_path / "sub.jsonl").mkdir()
    with pytest.raises(DataFileError, match=r"sub\.jsonl is a folder, not a file"):
        read_local(tmp_path, files=["sub.jsonl"])


_ENTRY = '"d": {"file_name": "in.jsonl", "columns": {"prompt": "prompt"}}'


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (codecs.BOM_UTF8 + f"{{{_ENTRY}}}".encode(), None),
        (f"{{{_ENTRY}}}".encode("utf-16"), None),
        (f"{{\r\n {_ENTRY}\r\n}}\r\n".encode(), None),
        (b'{\n "d": {"file_name": "in.jsonl",}\n}', r"json, line 2: malformed JSON"),
        (b'{"d": {"file_name": "caf\xe9.jsonl"}}', r"json, line 1: not UTF-8"),
        (b"", r"dataset_info\.json: the file is empty"),
        (b"[]", r"dataset_info\.json: must be a JSON object of datasets by name"),
        (b'{"d": "in.jsonl"}', r"dataset_info\.json, dataset 'd': must be a JSON"),
    ],
)
def test_dataset_info_json_as_editors_write_it(tmp_path, data, message):
    (tmp_path / "in.jsonl").write_text(JSONL)
    info = tmp_path / "dataset_info.json"
    info.write_bytes(data)
    if message is None:
        assert read_local(info, name="d").rows == [
            {"prompt": r["prompt"]} for r in ROWS
        ]
        return
    with pytest.raises(DataFileError, match=message):
        read_local(info, name="d")


def test_llamafactory_config_yaml_in_utf16_loads(tmp_path):
    from axolotl_prefalign.integrations.llamafactory.launcher import read_config

    path = tmp_path / "train.yaml"
    path.write_bytes("stage: dpo\r\nprefalign:\r\n  loss: ipo\r\n".encode("utf-16"))
    args, pa = read_config(path)
    assert args == {"stage": "dpo"} and pa.loss == "ipo"
