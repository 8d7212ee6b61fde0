"""Prompt refinement (提示词精炼) of a distilled student, and prompt distillation, on SST-2.

Stage "refine": load a saved student, wrap it in a PEFT adapter (prompt tuning by default; p-tuning or LoRA), and
train only the adapter with KD from the teacher. With `--teacher_prompt "..."` this becomes prompt (context)
distillation: the teacher reads the long hand-written prompt before every sentence, the student reads only its
learned soft prompt, and the report says how many prompt tokens each request no longer pays for.

Needs the main job's folders (`runs/sst2_minilm/{teacher,student}`):
    python recipes/prompt_refine.py --output_dir runs/sst2_prompt --student runs/sst2_minilm/teacher \\
        --teacher_prompt_preset instructions --num_virtual_tokens 16
    accelerate launch --multi_gpu --num_processes 2 recipes/prompt_refine.py --output_dir runs/sst2_prompt ...
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from hf_distill import DistillationConfig, DistillationTrainer, classification_metrics
from hf_distill.arguments import parse_recipe_args, run_recipe
from hf_distill.data import load_sst2
from hf_distill.prompts import make_peft_student, prompt_refine_config
from hf_distill.tasks import Task

PRESETS = {
    "instructions": (
        "Instructions: you will read one sentence from a movie review. Decide whether the reviewer's opinion of the "
        "film is positive or negative. A review is positive when it praises the acting, the story, the direction, "
        "the humour or the emotional impact, and negative when it complains that the film is dull, confusing, too "
        "long, badly acted or badly written. Sentence:"
    ),
}


@dataclass
class ScriptArguments:
    teacher: str = field(default="runs/sst2_minilm/teacher", metadata={"help": "Fine-tuned teacher folder."})
    student: str = field(
        default="runs/sst2_minilm/student",
        metadata={
            "help": "Saved student to refine (the teacher's own folder for prompt distillation into the same model)."
        },
    )
    method: str = field(default="prompt_tuning", metadata={"help": "prompt_tuning, p_tuning or lora."})
    num_virtual_tokens: int = field(default=16, metadata={"help": "Soft-prompt length."})
    init_text: str | None = field(
        default="Is this movie review positive or negative?",
        metadata={"help": "Initial text of the soft prompt (None: sampled vocabulary)."},
    )
    teacher_prompt_preset: str | None = field(
        default=None, metadata={"help": f"Long prompt for prompt distillation, one of {sorted(PRESETS)}."}
    )
    train_size: int | None = field(default=4000, metadata={"help": "Training sentences (None: all)."})
    max_length: int = field(default=64, metadata={"help": "Truncate sentences to this many tokens."})
    train_head: bool = field(default=False, metadata={"help": "Also train the classification head."})


def main(argv: list[str] | None = None) -> dict:
    script, args = parse_recipe_args((ScriptArguments, DistillationConfig), argv)
    if script.teacher_prompt_preset is not None:
        if script.teacher_prompt_preset not in PRESETS:
            raise SystemExit(
                f"Unknown teacher_prompt_preset {script.teacher_prompt_preset!r}; use one of {sorted(PRESETS)}."
            )
        args.teacher_prompt = PRESETS[script.teacher_prompt_preset]
    for folder in (script.teacher, script.student):
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise SystemExit(f"{folder} holds no saved model: run the main job first (README).")
    tokenizer = AutoTokenizer.from_pretrained(script.teacher)
    teacher = AutoModelForSequenceClassification.from_pretrained(script.teacher)
    base = AutoModelForSequenceClassification.from_pretrained(script.student)
    config = prompt_refine_config(
        Task.SEQUENCE_CLASSIFICATION,
        script.num_virtual_tokens,
        script.init_text,
        method=script.method,
        tokenizer_name_or_path=script.teacher,
    )
    student = make_peft_student(copy.deepcopy(base), config)
    if not script.train_head:
        for name, param in student.named_parameters():
            if "modules_to_save" in name:
                param.requires_grad_(False)
    data = load_sst2(train_size=script.train_size, seed=args.seed).map(
        lambda b: {**tokenizer(b["sentence"], truncation=True, max_length=script.max_length), "labels": b["label"]},
        batched=True,
        remove_columns=["sentence", "label"],
    )
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=classification_metrics,
    )
    trainer.train()
    student.save_pretrained(os.path.join(args.output_dir, "adapter"))
    tokenizer.save_pretrained(os.path.join(args.output_dir, "adapter"))
    results = evaluate(trainer, student, base, teacher, data["validation"], tokenizer)
    results.update(
        method=script.method,
        num_virtual_tokens=script.num_virtual_tokens,
        teacher_prompt_tokens=trainer.teacher_prompt.length if trainer.teacher_prompt else 0,
    )
    results["prompt_tokens_saved_per_request"] = max(0, results["teacher_prompt_tokens"] - script.num_virtual_tokens)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print("\n| model | SST-2 dev accuracy | agreement with the (prompted) teacher |\n|---|---|---|")
    for name in ("teacher", "student_before", "student_refined"):
        print(f"| {name} | {results[name]['accuracy']:.2f} | {results[name]['agreement']:.2f} |")
    print(
        f"\nprompt tokens saved per request: {results['prompt_tokens_saved_per_request']} "
        f"({results['teacher_prompt_tokens']} prompt tokens -> {script.num_virtual_tokens} virtual tokens)"
    )
    return results


@torch.no_grad()
def evaluate(trainer, student, base, teacher, dataset, tokenizer) -> dict:
    """Accuracy of each model on SST-2 dev, and how often it agrees with the teacher as it was trained to see it."""
    collate = DataCollatorWithPadding(tokenizer)
    predictions = {"teacher": [], "student_before": [], "student_refined": []}
    labels = []
    for start in range(0, len(dataset), 64):
        batch = collate([dataset[i] for i in range(start, min(start + 64, len(dataset)))])
        labels += batch.pop("labels").tolist()
        teacher_inputs = trainer.teacher_prompt.prepend(dict(batch)) if trainer.teacher_prompt else batch
        predictions["teacher"] += teacher.eval()(**teacher_inputs).logits.argmax(-1).tolist()
        predictions["student_before"] += base.eval()(**batch).logits.argmax(-1).tolist()
        predictions["student_refined"] += student.eval()(**batch).logits.argmax(-1).tolist()
    labels_t, teacher_t = torch.tensor(labels), torch.tensor(predictions["teacher"])
    return {
        name: {
            "accuracy": 100 * float((torch.tensor(p) == labels_t).float().mean()),
            "agreement": 100 * float((torch.tensor(p) == teacher_t).float().mean()),
        }
        for name, p in predictions.items()
    }


if __name__ == "__main__":
    run_recipe(main, "prompt_refine.py")
