"""Loads this folder's JSONL task data for lm-eval, found beside this file rather than under the current directory.

lm-eval's own `dataset_path: json` reads `data_files` relative to the working directory, so these tasks would only
load when run from the repository root. Each task YAML names `custom_dataset: !function local_data.load_splits`
instead, and lm-eval imports this file from the YAML's folder (lm_eval/tasks/_yaml_loader.py, _import_func_in_yml).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

HERE = Path(__file__).parent


def load_splits(data_files: dict[str, str], **metadata: Any) -> datasets.DatasetDict:
    """One split per entry of the task's `dataset_kwargs: data_files:`, each a JSONL file in this folder.

    lm-eval calls this with the task's metadata as keyword arguments too (its version, the model's arguments);
    they do not change the data, so they are ignored.
    """
    splits = {}
    for split, name in data_files.items():
        path = HERE / name
        with path.open(encoding="utf-8") as lines:
            rows = [json.loads(line) for line in lines if line.strip()]
        if not rows:
            raise ValueError(f"{path}: no JSON lines in the {split!r} split")
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)
