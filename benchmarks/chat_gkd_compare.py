"""TRL's `GKDTrainer` on the chat-distillation recipe's teacher, student, data, budget and evaluation.

The last row of the chat comparison (BENCHMARKS.md, "Chat distillation"): the same SmolLM2 teacher folder, the same
student cut (`--layers`), the same prompt/response rows tokenized by `hf_distill.chat.tokenize_chat` (TRL's
`DataCollatorForChatML` takes them pre-tokenized, with a `completion_mask` marking our labelled tokens, so both
trainers see the same token sequences and the same prompts to sample from), the same optimiser settings and seed,
and the recipe's own evaluation (ROUGE-L of greedy answers on the held-out rows, the teacher's perplexity of them).
TRL's GKD settings come from the same `DistillationConfig` fields: `lmbda`, `beta = jsd_beta`,
`temperature = generation_temperature` (TRL's sampling temperature; its loss runs at T = 1, as ours at
`temperature 1`), `max_new_tokens`, `seq_kd`. Differences that remain: TRL labels every token after the prompt
(including the newline after the end-of-turn token), ours the assistant turn only.

    pip install "trl==1.16.*"   # not a dependency of hf_distill: only the benchmarks need it
    python benchmarks/chat_gkd_compare.py recipes/configs/smollm2_chat.yaml --teacher TEACHER_FOLDER \\
        --layers 0,1,11,18,19,20,21,24,27,29 --kd_loss jsd --jsd_beta 0.5 --lmbda 0.5 --output_dir runs/chat/trl_gkd
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_distill import DistillationConfig
from hf_distill.arguments import parse_recipe_args
from hf_distill.chat import tokenize_chat, training_tokens_per_s
from hf_distill.data import resolve_teacher
from hf_distill.engine_timing import peak_rss_mb

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "chat_distill.py"
# TrainingArguments fields copied from the recipe's config into TRL's GKDConfig, so both runs train alike.
SHARED = (
    "learning_rate", "num_train_epochs", "max_steps", "warmup_steps", "lr_scheduler_type", "weight_decay",
    "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_strategy", "report_to",
    "use_cpu", "seed", "data_seed", "disable_tqdm",
)  # fmt: skip


def _recipe() -> Any:
    """The chat recipe's data rows, student cut and evaluation, so this run differs from it only in the trainer."""
    spec = importlib.util.spec_from_file_location("chat_distill_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def gkd_config(args: DistillationConfig, max_length: int) -> Any:
    """TRL's GKDConfig with the recipe's training settings and the GKD terms of ``args``."""
    from trl.experimental.gkd import GKDConfig

    if args.kd_loss != "jsd":
        raise ValueError(f"TRL's GKD loss is the generalized JSD: pass --kd_loss jsd (got {args.kd_loss!r}).")
    return GKDConfig(
        output_dir=str(Path(args.output_dir) / "trainer"),
        lmbda=args.lmbda,
        beta=args.jsd_beta,
        temperature=args.generation_temperature,
        max_new_tokens=args.max_new_tokens,
        seq_kd=args.seq_kd,
        max_length=max_length,
        # SFTConfig defaults that differ from TrainingArguments, off so both trainers do the same work
        gradient_checkpointing=False,
        bf16=False,
        **{name: getattr(args, name) for name in SHARED},
    )


def trl_row(row: dict[str, list[int]], tokenizer: Any) -> dict[str, Any]:
    """A pre-tokenized row for TRL's collator: ``completion_mask`` 1 on our labelled tokens; ``prompt``, the text
    before them (the collator reads it even when the row is tokenized)."""
    mask = [int(x != -100) for x in row["labels"]]
    return {"completion_mask": mask, "prompt": tokenizer.decode(row["input_ids"][: mask.index(1)])}


def main(argv: list[str] | None = None) -> dict:
    from trl.experimental.gkd import GKDTrainer

    recipe = _recipe()
    script, args = parse_recipe_args((recipe.ScriptArguments, DistillationConfig), argv)
    root = Path(args.output_dir)
    config = gkd_config(args, script.max_length)  # before any loading: a wrong loss fails at once
    teacher_dir = recipe.load_teacher_folder(resolve_teacher(script.teacher), root)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    rows = recipe.chat_rows(script.train_file, script.train_size, args.seed)
    tokenized = tokenize_chat(rows, tokenizer, max_length=script.max_length)
    data = tokenized.dataset.select_columns(["input_ids", "attention_mask", "labels"])
    student = recipe.make_student(teacher, script, data.select(range(min(script.calibration_size, len(data)))))
    train = data.map(lambda row: trl_row(row, tokenizer)).select_columns(
        ["input_ids", "attention_mask", "completion_mask", "prompt"]
    )
    trainer = GKDTrainer(
        model=student, teacher_model=teacher, args=config, train_dataset=train, processing_class=tokenizer
    )
    output = trainer.train()
    results: dict[str, Any] = {
        "trainer": "trl.experimental.gkd.GKDTrainer",
        "script": asdict(script),
        "gkd": {
            "lmbda": config.lmbda,
            "beta": config.beta,
            "temperature": config.temperature,
            "max_new_tokens": config.max_new_tokens,
            "seq_kd": config.seq_kd,
        },  # fmt: skip
        "kept_teacher_layers": student.config.hf_distill_teacher_layers,
        "train": {
            **output.metrics,
            "tokens_per_s": training_tokens_per_s(output.metrics, data),
            "peak_rss_mb": peak_rss_mb(),
        },
    }
    if script.eval_size:
        results["evaluation"] = recipe.evaluate({"student": trainer.model}, teacher, tokenizer, script, args.seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        raise SystemExit(f"chat_gkd_compare.py: error: {err}") from None
