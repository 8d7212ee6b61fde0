"""What every stage of `hf-distill run` receives: the checked config, the run folder, and the data (loaded once)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hf_distill.labels import LabelSet
from hf_distill.pipeline.config import PipelineConfig
from hf_distill.pipeline.workspace import Workspace


@dataclass
class RunContext:
    config: PipelineConfig
    workspace: Workspace
    command: str
    _raw: Any = field(default=None, repr=False)
    _tokenizer: Any = field(default=None, repr=False)
    _labels: LabelSet | None = field(default=None, repr=False)
    _unlabelled: Any = field(default=None, repr=False)

    def teacher_source(self) -> str:
        """The backbone or fine-tuned teacher named in the config (``minilm``: the offline MiniLM package)."""
        from hf_distill.data import minilm_path

        return minilm_path() if self.config.teacher.model == "minilm" else self.config.teacher.model

    def teacher_path(self) -> str:
        """The teacher the student learns from: the fine-tuned one, or the config's model as it is."""
        return str(self.workspace.teacher_dir) if self.config.teacher.finetune else self.teacher_source()

    def raw_data(self) -> Any:
        """``DatasetDict`` with ``train`` (sampled to ``data.train_size``) and ``validation`` from the data files."""
        from hf_distill.data import load_table

        if self._raw is None:
            import datasets

            d = self.config.data
            raw = datasets.DatasetDict({"train": load_table(d.train), "validation": load_table(d.validation)})
            rest = None
            if d.train_size is not None and d.train_size < len(raw["train"]):
                shuffled = raw["train"].shuffle(seed=self.config.seed)
                raw["train"] = shuffled.select(range(d.train_size))
                rest = shuffled.select(range(d.train_size, len(shuffled)))
            self._unlabelled = self._read_unlabelled(rest, raw["train"].column_names)
            self._raw = raw
        return self._raw

    def _read_unlabelled(self, rest: Any, train_columns: list[str]) -> Any:
        """``data.unlabelled`` as a Dataset of the training file's text column(s) only, or None.

        Raises:
            ValueError: the file lacks a text column the training data has.
        """
        from hf_distill.data import load_table, text_columns

        d = self.config.data
        if d.unlabelled is None:
            return None
        if d.unlabelled == "rest":
            if rest is None:
                raise ValueError(
                    f"data.unlabelled is 'rest', but data.train_size={d.train_size} takes every row of {d.train!r}: "
                    "none is left for unlabelled text. Lower data.train_size, or give data.unlabelled a file."
                )
            table = rest
        else:
            table = load_table(d.unlabelled).shuffle(seed=self.config.seed)
        wanted = [c for c in text_columns(train_columns, d.text_column) if c]
        missing = [c for c in wanted if c not in table.column_names]
        if missing:
            raise ValueError(
                f"The unlabelled data {d.unlabelled!r} has no column {missing} (it has {table.column_names}); it "
                "needs the training data's text column(s)."
            )
        if d.unlabelled_size is not None and d.unlabelled_size < len(table):
            table = table.select(range(d.unlabelled_size))
        return table.select_columns(wanted)

    def unlabelled_data(self) -> Any:
        """The unlabelled rows (text columns only) for the soft loss, or None without ``data.unlabelled``."""
        self.raw_data()
        return self._unlabelled

    def labels(self) -> LabelSet:
        """The classes: from the data and ``data.label_names``; the teacher's own when it is used as it is.

        Raises:
            ValueError: see :func:`hf_distill.labels.labels_from_data` and :func:`~hf_distill.labels.agree_with_model`.
        """
        from hf_distill.labels import agree_with_model, labels_from_data

        if self._labels is None:
            d, raw = self.config.data, self.raw_data()
            labels = labels_from_data(
                raw["train"][d.label_column],
                raw["validation"][d.label_column],
                d.label_names,
                where=(f"the training file {d.train}", f"the validation file {d.validation}"),
            )
            if not self.config.teacher.finetune:
                from transformers import AutoConfig

                try:
                    model_labels = AutoConfig.from_pretrained(self.teacher_source()).id2label
                except OSError as err:
                    raise ValueError(f"Cannot read the teacher's config.json ({self.teacher_source()}): {err}") from err
                labels = agree_with_model(labels, model_labels, self.teacher_source(), d.label_names is not None)
            self._labels = labels
        return self._labels

    def labelled_data(self) -> Any:
        """:meth:`raw_data` with the label column turned into class ids (what export validates with)."""
        column, labels = self.config.data.label_column, self.labels()
        return self.raw_data().map(lambda batch: {column: labels.encode(batch[column])}, batched=True)

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.teacher_source())
        return self._tokenizer

    def tokenized(self) -> tuple[Any, Any]:
        from hf_distill.data import tokenize_text_classification

        d = self.config.data
        data = tokenize_text_classification(
            self.tokenizer(), self.raw_data(), d.text_column, d.label_column, d.max_length, self.labels()
        )
        unlabelled = self.unlabelled_data()
        if unlabelled is not None:
            import datasets

            text = datasets.DatasetDict(unlabelled=unlabelled)
            data["unlabelled"] = tokenize_text_classification(
                self.tokenizer(), text, d.text_column, None, d.max_length
            )["unlabelled"]
        return data, self.tokenizer()
