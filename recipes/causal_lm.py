"""Causal-LM distillation on tinyshakespeare: train a teacher LM, cut a student, compare KD losses.

Stages (each its own folder under --output_dir, reused when present):
  tokenizer/   byte-level BPE trained with `tokenizers` on the training part of the corpus
  teacher/     a Llama-style LM (default 6 layers, 384 wide) trained from scratch for --teacher_steps
  <name>/      2-layer students cut from the teacher, trained for --student_steps: `no_kd` (labels only) and one per
               --kd_losses entry (alpha=1, pure distillation)
  results.json held-out perplexity of every model, the fraction of the teacher's gain each student recovers, and
               the teacher's held-out perplexity along its training (`teacher_curve`: did the budget converge it?)

    python recipes/causal_lm.py --output_dir runs/shakespeare --teacher_steps 600 --student_steps 300
    accelerate launch --multi_gpu --num_processes 2 recipes/causal_lm.py --output_dir runs/shakespeare --use_cpu true
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from hf_distill import DistillationConfig, DistillationTrainer, create_student
from hf_distill.arguments import parse_recipe_args, run_recipe

CORPUS = Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare" / "input.txt"


@dataclass
class ScriptArguments:
    corpus: str = field(default=str(CORPUS), metadata={"help": "Plain-text corpus; its last 10% is held out."})
    vocab_size: int = field(default=2048, metadata={"help": "BPE vocabulary size."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training sequence."})
    teacher_layers: int = field(default=6, metadata={"help": "Teacher depth."})
    hidden_size: int = field(default=384, metadata={"help": "Teacher width (the student keeps it)."})
    student_layers: int = field(default=2, metadata={"help": "Student depth (cut from the teacher)."})
    teacher_steps: int = field(default=600, metadata={"help": "Teacher training steps (fixed budget)."})
    student_steps: int = field(default=300, metadata={"help": "Training steps of every student."})
    kd_losses: str = field(default="forward_kl,reverse_kl,jsd", metadata={"help": "Comma-separated KD losses."})
    eval_blocks: int = field(default=64, metadata={"help": "Held-out blocks for perplexity."})


def train_tokenizer(corpus: str, vocab_size: int, folder: Path) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(folder)
    text = Path(corpus).read_text()
    train_text = text[: int(len(text) * 0.9)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([train_text[i : i + 10_000] for i in range(0, len(train_text), 10_000)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")
    fast.save_pretrained(folder)
    return fast


def blocks(tokenizer: PreTrainedTokenizerFast, corpus: str, block_size: int) -> datasets.DatasetDict:
    """Train/held-out splits of contiguous token blocks (the held-out part is the corpus's last 10%)."""
    text = Path(corpus).read_text()
    cut = int(len(text) * 0.9)
    result = {}
    for split, part in (("train", text[:cut]), ("test", text[cut:])):
        ids = tokenizer(part)["input_ids"]
        rows = [ids[i : i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]
        result[split] = datasets.Dataset.from_dict(
            {"input_ids": rows, "attention_mask": [[1] * block_size] * len(rows), "labels": rows}
        )
    return datasets.DatasetDict(result)


@torch.no_grad()
def perplexity(model: torch.nn.Module, dataset: datasets.Dataset, batch_size: int = 16) -> float:
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        ids = torch.tensor(dataset[start : start + batch_size]["input_ids"])
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        nll += float(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
        )
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


def main(argv: list[str] | None = None) -> dict:
    script, args = parse_recipe_args((ScriptArguments, DistillationConfig), argv)
    root = Path(args.output_dir)
    tokenizer = train_tokenizer(script.corpus, script.vocab_size, root / "tokenizer")
    data = blocks(tokenizer, script.corpus, script.block_size)
    held_out = data["test"].select(range(min(script.eval_blocks, len(data["test"]))))
    results: dict = {
        "train_blocks": len(data["train"]),
        "held_out_blocks": len(held_out),
        "block_size": script.block_size,
        "script": vars(script),
    }
    teacher_dir = root / "teacher"
    if not (teacher_dir / "model.safetensors").is_file():
        torch.manual_seed(args.seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=script.hidden_size,
            intermediate_size=4 * script.hidden_size,
            num_hidden_layers=script.teacher_layers,
            num_attention_heads=max(1, script.hidden_size // 64),
            num_key_value_heads=max(1, script.hidden_size // 64),
            max_position_embeddings=script.block_size,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True,
        )
        teacher_args = TrainingArguments(
            output_dir=str(root / "teacher_checkpoints"),
            max_steps=script.teacher_steps,
            learning_rate=1e-3,
            warmup_steps=min(100, script.teacher_steps // 10),
            per_device_train_batch_size=args.per_device_train_batch_size,
            weight_decay=0.1,
            logging_steps=args.logging_steps,
            save_strategy="no",
            report_to="none",
            seed=args.seed,
            use_cpu=args.use_cpu,
            disable_tqdm=args.disable_tqdm,
            # Held-out loss along the way shows whether the fixed budget brought the teacher to convergence.
            eval_strategy="steps",
            eval_steps=max(1, script.teacher_steps // 6),
            per_device_eval_batch_size=16,
        )
        trainer = Trainer(
            model=LlamaForCausalLM(config),
            args=teacher_args,
            train_dataset=data["train"],
            eval_dataset=held_out,
            data_collator=default_data_collator,
        )
        trainer.train()
        curve = [
            {"step": log["step"], "held_out_perplexity": math.exp(log["eval_loss"])}
            for log in trainer.state.log_history
            if "eval_loss" in log
        ]
        trainer.save_model(str(teacher_dir))
        tokenizer.save_pretrained(teacher_dir)
        if trainer.is_world_process_zero():
            (teacher_dir / "training_curve.json").write_text(json.dumps(curve, indent=2))
    teacher = LlamaForCausalLM.from_pretrained(teacher_dir)
    if (teacher_dir / "training_curve.json").is_file():
        results["teacher_curve"] = json.loads((teacher_dir / "training_curve.json").read_text())
    results["teacher_perplexity"] = perplexity(teacher, held_out)
    runs = [("no_kd", "forward_kl", 0.0)] + [(loss, loss, 1.0) for loss in script.kd_losses.split(",") if loss]
    for name, loss, alpha in runs:
        student = create_student(teacher, num_layers=script.student_layers)
        if name == runs[0][0]:
            results["student_init_perplexity"] = perplexity(student, held_out)
        run_args = DistillationConfig(
            **{
                **{
                    k: getattr(args, k)
                    for k in (
                        "per_device_train_batch_size",
                        "seed",
                        "use_cpu",
                        "disable_tqdm",
                        "logging_steps",
                        "temperature",
                        "jsd_beta",
                        "learning_rate",
                    )
                },
                "output_dir": str(root / f"{name}_checkpoints"),
                "kd_loss": loss,
                "alpha": alpha,
                "max_steps": script.student_steps,
                "save_strategy": "no",
                "report_to": "none",
                "warmup_steps": min(30, script.student_steps // 10),
            }
        )
        trainer = DistillationTrainer(
            model=student,
            teacher=teacher,
            args=run_args,
            train_dataset=data["train"],
            data_collator=default_data_collator,
        )
        trainer.train()
        trainer.save_model(str(root / name))
        results[f"{name}_perplexity"] = perplexity(student, held_out)
    base = results["student_init_perplexity"]
    for name, _, _ in runs:
        # Share of the gap between the untrained cut student and the teacher that training closed (log scale).
        gap = math.log(base) - math.log(results["teacher_perplexity"])
        results[f"{name}_recovered"] = (math.log(base) - math.log(results[f"{name}_perplexity"])) / gap if gap else 0
    if int(os.environ.get("RANK", "0")) == 0:
        (root / "results.json").write_text(json.dumps(results, indent=2))
        print("\n| model | held-out perplexity | teacher gain recovered |\n|---|---|---|")
        print(f"| teacher ({script.teacher_layers} layers) | {results['teacher_perplexity']:.2f} | 100% |")
        for name, _, _ in runs:
            print(
                f"| student {script.student_layers} layers, {name} | {results[f'{name}_perplexity']:.2f} | "
                f"{100 * results[f'{name}_recovered']:.1f}% |"
            )
    return results


if __name__ == "__main__":
    run_recipe(main, "causal_lm.py")
