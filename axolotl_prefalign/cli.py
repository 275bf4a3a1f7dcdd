"""`axolotl prefalign ...` and the standalone `prefalign ...` command group.

Each command imports its pipeline only when it runs, so `--help` stays fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

OFFLINE_ENV = {"AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}


def offline_env() -> None:
    """No telemetry, no hub: the pipelines only ever read local files."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def load_config(config: str | Path):
    """Load and validate an Axolotl YAML (with our plugin) the way `axolotl train`
    does; returns Axolotl's DictDefault config."""
    offline_env()
    import logging

    from axolotl.cli.config import load_cfg

    # load_cfg logs the whole resolved config at INFO: noise for our commands.
    quiet = logging.getLogger("axolotl.cli.config")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        return load_cfg(str(config))
    finally:
        quiet.setLevel(level)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe bad input or a failed stage: shown without traceback."""
    from .core.config import PrefAlignConfigError
    from .core.models import DefaultModelError
    from .core.rows import BadRowError
    from .core.text_files import DataFileError
    from .integrations.llamafactory.export import ExportError
    from .integrations.llamafactory.launcher import LaunchError
    from .robustft.answers import LabelError
    from .robustft.pipeline import RobustFTError
    from .robustft.relabel import EncoderError
    from .spa.loop import SpaLoopError

    return (
        PrefAlignConfigError,
        DefaultModelError,
        BadRowError,
        DataFileError,
        FileNotFoundError,
        SpaLoopError,
        RobustFTError,
        EncoderError,
        LabelError,
        ExportError,
        LaunchError,
    )


class PrefAlignGroup(click.Group):
    """Turns bad-input errors into one clear line instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except _user_errors() as err:
            raise click.ClickException(f"{type(err).__name__}: {err}") from err


config_arg = click.argument(
    "config", type=click.Path(exists=True, dir_okay=False, path_type=Path)
)


@click.group(name="prefalign", cls=PrefAlignGroup)
def prefalign() -> None:
    """SPA, plaintext contrast SFT, RobustFT and data tools for Axolotl."""
    offline_env()


@prefalign.command("prepare-model")
@click.option("--force", is_flag=True, help="Convert again even if cached.")
def prepare_model(force: bool) -> None:
    """Turn the embedded SmolLM2-135M-Instruct (GGUF) into a local HF folder."""
    from .core.models import DefaultModelError, prepare_default_model

    try:
        path = prepare_default_model(force=force)
    except DefaultModelError as err:
        raise click.ClickException(str(err)) from err
    click.echo(str(path))


@prefalign.command("contrast-preview")
@config_arg
@click.option("-n", "num_rows", default=3, show_default=True, help="Rows to show.")
def contrast_preview(config: Path, num_rows: int) -> None:
    """Print rendered contrast rows with the loss-carrying span marked."""
    from .integrations.axolotl.contrast import preview_config
    from .integrations.axolotl.dataset_check import deferred

    # The preview shows bad rows as such, so the load does not stop at the first.
    with deferred():
        cfg = load_config(config)
    preview_config(cfg, num_rows=num_rows, echo=click.echo)


@prefalign.command("spa-expand")
@config_arg
@click.option("--iteration", "-i", type=int, required=True, help="SPA iteration.")
@click.option("--model", "model_path", default=None, help="Current model (π_{i-1}).")
@click.option("--out", "out_dir", default=None, help="Output folder for the pairs.")
def spa_expand(config: Path, iteration: int, model_path, out_dir) -> None:
    """Sample responses for new prompts and label them with the implicit reward."""
    from .integrations.axolotl.spa_loop import expand_from_config

    expand_from_config(load_config(config), iteration, model_path, out_dir)


@prefalign.command("spa-premise")
@config_arg
@click.option(
    "--samples",
    "-n",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Prompts with a gold answer to sample and judge.",
)
@click.option(
    "--model",
    "model_path",
    default=None,
    help="Model folder or LoRA adapter whose implicit reward judges (default: "
    "the loop's seed DPO, output_dir/iter_0).",
)
def spa_premise(config: Path, samples: int, model_path) -> None:
    """Check SPA's premise first: is the judge right above chance against gold?
    One expansion on a sample of gold prompts; trains nothing."""
    from .integrations.axolotl.spa_loop import premise_from_config
    from .spa.premise import format_premise

    cfg = load_config(config)
    click.echo(
        format_premise(premise_from_config(cfg, samples, model_path, str(config)))
    )


@prefalign.command("spa")
@config_arg
def spa(config: Path) -> None:
    """Run the SPA loop: seed DPO, then expand → train for each iteration."""
    from .integrations.axolotl.spa_loop import run_from_config

    run_from_config(load_config(config), config_path=config)


@prefalign.command("denoise")
@config_arg
def denoise(config: Path) -> None:
    """RobustFT: detect, relabel and select the noisy rows of an SFT set."""
    from .robustft.pipeline import denoise_from_config

    denoise_from_config(load_config(config))


@prefalign.command("robustft-premise")
@config_arg
@click.option(
    "--rows",
    "-n",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Rows with a gold answer to sample per RobustFT dataset entry.",
)
def robustft_premise(config: Path, rows: int) -> None:
    """Check RobustFT's premise first: is an expert right more often than the
    labels against gold? Expert predictions only; relabels nothing."""
    from .integrations.axolotl.dataset_check import deferred
    from .robustft.premise import check_premise, format_premise

    # The check samples only the rows that have gold: rows without it are no
    # error here, so the load does not pre-check the whole set.
    with deferred():
        cfg = load_config(config)
    result = check_premise(cfg, rows, config=str(config))
    click.echo(format_premise(result))


@prefalign.command("eval-pairs")
@config_arg
@click.option(
    "--split",
    required=True,
    help="Held-out rows of the dataset, in Axolotl's split syntax (e.g. train[60:]).",
)
@click.option(
    "--trained",
    "trained",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="LoRA adapter or model folder to compare with the base (default: "
    "the YAML's output_dir).",
)
@click.option("--dataset", "dataset_index", default=0, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
def eval_pairs(config: Path, split: str, trained, dataset_index, batch_size) -> None:
    """Held-out preference accuracy (logp chosen > logp rejected), base vs trained."""
    from .integrations.axolotl.eval_pairs import evaluate_heldout

    result = evaluate_heldout(
        load_config(config),
        split,
        trained,
        dataset_index=dataset_index,
        batch_size=batch_size,
    )
    click.echo(result.line())


@prefalign.command("export")
@click.option(
    "--to",
    "target",
    type=click.Choice(["llamafactory"]),
    required=True,
    help="Framework to write for.",
)
@config_arg
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
def export(target: str, config: Path, out_dir: Path) -> None:
    """Write the YAML's prepared data (contrast, SPA pairs, RobustFT) for another
    framework, with its dataset declarations (LLaMA-Factory: dataset_info.json)."""
    from .integrations.llamafactory.export import ExportError, export_from_config

    try:
        export_from_config(load_config(config), out_dir, target=target, echo=click.echo)
    except ExportError as err:
        raise click.ClickException(f"ExportError: {err}") from err


@prefalign.group("llamafactory")
def llamafactory() -> None:
    """Run LLaMA-Factory with prefalign's DPO trainer and dataset converters."""
    from .integrations.llamafactory.launcher import log_to_stderr

    log_to_stderr()


# `key=value` after a LLaMA-Factory config, merged into it as llamafactory-cli does.
overrides_arg = click.argument("overrides", nargs=-1)


@llamafactory.command("train")
@config_arg
@overrides_arg
def llamafactory_train(config: Path, overrides: tuple[str, ...]) -> None:
    """Train a LLaMA-Factory YAML (plus a `prefalign:` block) with our trainer;
    `key=value` overrides as with llamafactory-cli."""
    from .integrations.llamafactory.launcher import train

    train(config, overrides)


@llamafactory.command("spa")
@config_arg
def llamafactory_spa(config: Path) -> None:
    """Run the SPA loop with LLaMA-Factory training each stage."""
    from .integrations.llamafactory.spa_loop import run

    run(config)


@llamafactory.command("denoise")
@config_arg
@overrides_arg
def llamafactory_denoise(config: Path, overrides: tuple[str, ...]) -> None:
    """RobustFT on the YAML's LLaMA-Factory datasets; writes <name>_robustft."""
    from .integrations.llamafactory.robustft import denoise

    denoise(config, overrides, echo=click.echo)


def main() -> None:  # pragma: no cover - console entry
    prefalign(prog_name=Path(sys.argv[0]).name)
