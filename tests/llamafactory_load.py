"""Load exported data with LLaMA-Factory's own code (run with LLaMA-Factory's Python).

    python tests/llamafactory_load.py SPEC.json OUT.json

SPEC.json is a list of {"yaml": path, "overrides": {...}}. Each YAML (one of the
samples in yaml_examples/llamafactory/) is parsed by LLaMA-Factory's
`get_train_args` (unknown keys are an error there) with the overrides applied
(local model, dataset_dir, output_dir), its dataset is loaded and tokenized by
`get_dataset` exactly as `llamafactory-cli train` does, and the tokenized rows are
written to OUT.json. Not a test module: tests/test_export_llamafactory.py runs it.
"""

from __future__ import annotations

import json
import sys

import yaml


def load(spec: dict) -> dict:
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    with open(spec["yaml"], encoding="utf-8") as fh:
        args = yaml.safe_load(fh)
    args.update(spec.get("overrides", {}))
    model_args, data_args, training_args, finetuning_args, _ = get_train_args(args)
    tokenizer_module = load_tokenizer(model_args)
    tokenizer = tokenizer_module["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    # As LLaMA-Factory's workflows: DPO/RM read pairwise data (stage "rm").
    stage = "rm" if finetuning_args.stage in ("dpo", "rm") else "sft"
    module = get_dataset(
        template, model_args, data_args, training_args, stage, **tokenizer_module
    )
    ds = module["train_dataset"]
    keep = [c for c in ds.column_names if c.endswith(("input_ids", "labels"))]
    return {
        "stage": finetuning_args.stage,
        "template": data_args.template,
        "dataset": data_args.dataset,
        "rows": [{k: row[k] for k in keep} for row in ds],
    }


def main() -> None:
    spec_path, out_path = sys.argv[1], sys.argv[2]
    with open(spec_path, encoding="utf-8") as fh:
        specs = json.load(fh)
    result = {s["yaml"]: load(s) for s in specs}
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
