"""The package's floors: imports go down only, and the YAML import paths resolve.

Floors (docs/architecture.md): core < methods (contrast, spa, robustft) <
integrations (axolotl, llamafactory) < cli. Core and the methods never import a
training framework; the only upward references are the YAML doors listed below.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

PKG = REPO / "axolotl_prefalign"
FRAMEWORKS = {"axolotl", "trl", "llamafactory"}
METHODS = ("contrast", "spa", "robustft")
FLOOR = {"core": 0, "contrast": 1, "spa": 1, "robustft": 1, "integrations": 2}
# The YAML-facing doors: `type: axolotl_prefalign.contrast` / `.robustft` reach a
# `load` of the method package, which defers to its Axolotl side.
DOORS = {("contrast/__init__.py", "load"), ("robustft/__init__.py", "load")}


def _imports(path: Path, root: Path, package: str):
    """(absolute module, enclosing function or None, line) of every import."""
    rel = path.relative_to(root).with_suffix("")
    parts = [package, *rel.parts]
    here = parts[:-1]  # the package a relative import starts from
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []

    def visit(node, func):
        for child in ast.iter_child_nodes(node):
            name = func
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = func or child.name
            if isinstance(child, ast.Import):
                found.extend((a.name, func, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = here[: len(here) - child.level + 1]
                    mod = ".".join([*base, *([child.module] if child.module else [])])
                else:
                    mod = child.module or ""
                found.append((mod, func, child.lineno))
            visit(child, name)

    visit(tree, None)
    return found


def floor_violations(root: Path, package: str = "axolotl_prefalign") -> list[str]:
    """Every import in `root` that goes up a floor or reaches a framework from the
    core or a method, as 'file:line: what'."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        top = rel.parts[0] if len(rel.parts) > 1 else None
        if top not in FLOOR:
            continue  # cli, the package door, the trainers door
        for mod, func, line in _imports(path, root, package):
            first = mod.split(".")[0]
            where = f"{rel.as_posix()}:{line}"
            if first in FRAMEWORKS and FLOOR[top] < FLOOR["integrations"]:
                problems.append(f"{where}: {top}/ imports the framework {mod!r}")
            if first != package:
                continue
            parts = mod.split(".")
            target = parts[1] if len(parts) > 1 else ""
            if target not in FLOOR:
                problems.append(f"{where}: imports {mod!r} above the floors")
            elif FLOOR[target] > FLOOR[top] and (rel.as_posix(), func) not in DOORS:
                problems.append(f"{where}: {top}/ imports {mod!r}, a floor up")
            elif FLOOR[target] == FLOOR[top] == 1 and target != top:
                problems.append(f"{where}: method {top}/ imports method {target}/")
            elif target == top == "integrations" and parts[2:3] != [rel.parts[1]]:
                problems.append(f"{where}: one integration imports another ({mod})")
    return problems


def test_core_and_methods_never_import_a_framework_and_imports_go_down():
    assert floor_violations(PKG) == []


@pytest.mark.parametrize(
    "source, expected",
    [
        ("import axolotl\n", "core/ imports the framework 'axolotl'"),
        (
            "from trl.trainer import utils\n",
            "core/ imports the framework 'trl.trainer'",
        ),
        ("from ..spa import judge\n", "core/ imports 'axolotl_prefalign.spa', a floor"),
        ("def f():\n    from ..integrations.axolotl import plugin\n", "a floor up"),
        ("from .. import cli\n", "above the floors"),
    ],
)
def test_the_floor_check_catches_each_kind_of_bad_import(tmp_path, source, expected):
    root = tmp_path / "axolotl_prefalign"
    (root / "core").mkdir(parents=True)
    (root / "core" / "bad.py").write_text(source)
    problems = floor_violations(root)
    assert len(problems) == 1 and expected in problems[0], problems
    assert problems[0].startswith("core/bad.py:")


def test_a_method_importing_another_method_or_an_integration_is_caught(tmp_path):
    root = tmp_path / "axolotl_prefalign"
    (root / "spa").mkdir(parents=True)
    (root / "spa" / "x.py").write_text(
        "from ..robustft import answers\nfrom ..integrations.axolotl import plugin\n"
    )
    (root / "integrations" / "llamafactory").mkdir(parents=True)
    (root / "integrations" / "llamafactory" / "y.py").write_text(
        "from ..axolotl import plugin\n"
    )
    assert floor_violations(root) == [
        "integrations/llamafactory/y.py:1: one integration imports another "
        "(axolotl_prefalign.integrations.axolotl)",
        "spa/x.py:1: method spa/ imports method robustft/",
        "spa/x.py:2: spa/ imports 'axolotl_prefalign.integrations.axolotl', a floor up",
    ]


def test_core_and_methods_import_with_no_framework_installed():
    """Importing every core and method module with axolotl, trl and llamafactory
    made unimportable: the algorithms run without either framework."""
    modules = [
        ".".join(
            ("axolotl_prefalign", *p.relative_to(PKG).with_suffix("").parts)
        ).removesuffix(".__init__")
        for top in ("core", *METHODS)
        for p in sorted((PKG / top).rglob("*.py"))
    ]
    script = f"""
import importlib, importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {sorted(FRAMEWORKS)!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
for m in {modules!r}:
    importlib.import_module(m)
print(len({modules!r}), "modules")
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{len(modules)} modules" in out.stdout


# -- the import paths users write in YAML ------------------------------------------


def test_plugin_path_loads_through_axolotls_plugin_loader():
    from axolotl.integrations.base import load_plugin

    from axolotl_prefalign.integrations.axolotl.plugin import PrefAlignPlugin

    assert isinstance(load_plugin("axolotl_prefalign.PrefAlignPlugin"), PrefAlignPlugin)


def test_spa_pairs_type_resolves_through_axolotls_dpo_loader(tiny_tokenizer):
    from axolotl.prompt_strategies.dpo import load as load_dpo

    cfg = {"datasets": [{"path": "x.jsonl", "type": "axolotl_prefalign.spa_pairs"}]}
    fn, kwargs = load_dpo("axolotl_prefalign.spa_pairs", cfg, dataset_idx=0)
    out = fn(
        {"prompt": ["2+2?"], "chosen": ["4"], "rejected": ["5"]},
        [0],
        tokenizer=tiny_tokenizer,
    )
    assert out["judge_prob"] == [1.0] and kwargs["remove_columns"] == "__all__"


@pytest.mark.parametrize(
    "type_name, strategy",
    [
        ("axolotl_prefalign.contrast", "ContrastFormat"),
        ("axolotl_prefalign.robustft", "RobustFTStrategy"),
    ],
)
def test_sft_types_resolve_through_axolotls_strategy_loader(
    tiny_tokenizer, type_name, strategy
):
    from axolotl.prompt_strategies import load as load_strategy
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault(sequence_len=64, datasets=[{"path": "x", "type": type_name}])
    ds_cfg = DictDefault(path="x.jsonl", type=type_name)
    got = load_strategy(type_name, tiny_tokenizer, cfg, ds_cfg)
    assert type(got).__name__ == strategy


@pytest.mark.parametrize(
    "path, name",
    [
        ("axolotl_prefalign.trainers.PrefAlignDPOTrainer", "PrefAlignDPOTrainer"),
        ("axolotl_prefalign.trainers.ContrastSFTTrainer", "ContrastSFTTrainer"),
    ],
)
def test_trainer_cls_paths_resolve_through_axolotls_helper(path, name):
    from axolotl.utils.import_helper import get_cls_from_module_str

    cls = get_cls_from_module_str(path)
    assert cls.__name__ == name
    assert cls.__module__.startswith("axolotl_prefalign.integrations.axolotl.trainers")


def test_unknown_trainer_name_is_an_attribute_error():
    import axolotl_prefalign.trainers as doors

    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        doors.Nope  # noqa: B018
