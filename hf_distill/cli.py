"""`hf-distill` command line: single stages that talk through folders on disk."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from hf_distill.export.engine import ENGINES
from hf_distill.export.genai import GENAI_VARIANTS
from hf_distill.export.variants import VARIANT_FILES


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def _command_line(argv: list[str] | None) -> str:
    import shlex

    return "hf-distill " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-distill", description="Distil, export and benchmark small models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "The whole job: teacher, student, distill, refine, export, bench, report, push."),
        ("distill", "Stages teacher, student and distill of a config."),
        ("push", "Build the model card and upload folder of a finished run and push it."),
    ):
        stage = sub.add_parser(name, help=help_text)
        stage.add_argument("config", help="YAML config (see recipes/configs/).")
        stage.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="Override a config key, e.g. --set distill.temperature=3 (repeatable).",
        )
        stage.add_argument("--force", action="store_true", help="Redo finished stages / reuse a foreign output_dir.")
        if name == "run":
            stage.add_argument("--stages", default=None, help="Comma-separated subset of the stages to run.")
    _add_export(sub.add_parser("export", help="Export a saved student to validated ONNX variants."))
    _add_bench(sub.add_parser("bench", help="Benchmark an export folder against PyTorch eager."))
    _add_generate(sub)
    _add_evaluate(sub)
    return parser


def _add_export(exp: argparse.ArgumentParser) -> None:
    exp.add_argument("model_dir", help="Folder written by save_pretrained / trainer.save_model.")
    exp.add_argument("output_dir", help="Export folder to create.")
    exp.add_argument("--data", required=True, help="Validation data (.tsv/.csv/.jsonl or save_to_disk folder).")
    exp.add_argument("--calibration-data", default=None, help="Calibration data for int8_static (default: --data).")
    exp.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="auto (default): decoder LMs that onnxruntime-genai's builder supports export with a KV cache, "
        "everything else through torch.onnx; torch: force the no-cache graph; genai: require onnxruntime-genai.",
    )
    exp.add_argument(
        "--variants",
        default=None,
        help=f"Comma-separated. torch.onnx: from {','.join(VARIANT_FILES)} (default fp32,fp32_optimized,"
        f"int8_dynamic); onnxruntime-genai: from {','.join(GENAI_VARIANTS)} (default int4).",
    )
    exp.add_argument(
        "--text-column", default=None, help="Text column of --data (default: sentence; text for causal LMs)."
    )
    exp.add_argument(
        "--text-pair-column",
        default="auto",
        help="Second text of sentence pairs; 'auto' (default) finds GLUE's pair columns (sentence1/sentence2, "
        "question1/question2, question/sentence, premise/hypothesis), 'none' reads single texts.",
    )
    exp.add_argument("--label-column", default="label")
    exp.add_argument("--num-validation", type=int, default=872)
    exp.add_argument("--num-calibration", type=int, default=64)
    exp.add_argument("--max-length", type=int, default=128)
    exp.add_argument(
        "--max-metric-drop",
        type=float,
        default=None,
        help="Accuracy or R² points (default 1) or perplexity percent (default 1; onnxruntime-genai: 5) a variant "
        "may lose; NaN/inf outputs always fail.",
    )
    llm = exp.add_argument_group("decoder LMs through onnxruntime-genai")
    llm.add_argument("--min-greedy-agreement", type=float, default=0.8, help="Share of PyTorch's greedy tokens.")
    llm.add_argument("--num-prompts", type=int, default=8, help="Prompts for the greedy agreement.")
    llm.add_argument("--block-size", type=int, default=32, help="int4/int8 quantization block size.")
    llm.add_argument("--accuracy-level", type=int, default=4, help="MatMulNBits accuracy level (1 fp32 .. 4 int8).")
    exp.add_argument("--allow-failed", action="store_true", help="Keep variants that fail the gate, marked failed.")
    exp.add_argument("--force", action="store_true", help="Replace an existing output folder.")


def _add_bench(bench: argparse.ArgumentParser) -> None:
    bench.add_argument("export_dir")
    bench.add_argument("--student", default=None, help="Saved student folder (PyTorch eager row).")
    bench.add_argument("--teacher", default=None, help="Saved teacher folder (PyTorch eager row).")
    bench.add_argument("--teacher-metric", type=float, default=None, help="Teacher's metric, for the table.")
    bench.add_argument("--variants", default=None, help="Comma-separated variants (default: all that passed).")
    bench.add_argument("--batch-sizes", type=_ints, default=None, help="Default 1,8 (decoder LMs: 1,4).")
    bench.add_argument(
        "--seq-lens", type=_ints, default=None, help="Default 64,128 (decoder LMs: prompt lengths 128,512)."
    )
    bench.add_argument("--warmup", type=int, default=5, help="Untimed runs per row (classifier exports).")
    bench.add_argument("--runs", type=int, default=None, help="Timed runs per row: default 30 (decoder LMs: 3).")
    bench.add_argument("--new-tokens", type=int, default=64, help="Generated tokens per decode run (decoder LMs).")
    bench.add_argument("--threads", type=int, default=None)
    bench.add_argument("--output-dir", default=None, help="Where bench.json/md/png go (default: the export folder).")


def _add_generate(sub: Any) -> None:
    gen = sub.add_parser("generate", help="Sequence-level KD data: the teacher answers every prompt of a dataset.")
    gen.add_argument("teacher", help="Teacher folder, Hub id or .gguf file (a causal LM with a chat template).")
    gen.add_argument("data", help="Prompts: .jsonl/.csv/.tsv or save_to_disk folder (prompt column or messages).")
    gen.add_argument("output_dir", help="New folder for the generated dataset (save_to_disk).")
    gen.add_argument("--prompt-column", default="prompt")
    gen.add_argument("--system-prompt", default=None)
    gen.add_argument("--limit", type=int, default=None, help="Answer only the first N prompts.")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--batch-size", type=int, default=8)
    gen.add_argument("--do-sample", action="store_true", help="Sample (default: greedy decoding).")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)


def _add_evaluate(sub: Any) -> None:
    ev = sub.add_parser("evaluate", help="ROUGE-L of a chat model's greedy answers; the teacher's perplexity of them.")
    ev.add_argument("model", help="Student folder, Hub id or .gguf file (a causal LM with a chat template).")
    ev.add_argument("data", help="Rows with prompt and reference response: .jsonl/.csv/.tsv or save_to_disk folder.")
    ev.add_argument("--teacher", default=None, help="Teacher (folder, Hub id or .gguf) scoring the answers.")
    ev.add_argument("--prompt-column", default="prompt")
    ev.add_argument("--response-column", default="response")
    ev.add_argument("--system-prompt", default=None)
    ev.add_argument("--limit", type=int, default=None, help="Evaluate only the first N rows.")
    ev.add_argument("--max-new-tokens", type=int, default=128)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--num-samples", type=int, default=3, help="Sample generations printed and saved.")
    ev.add_argument("--output", default=None, help="JSON file for the scores, samples and every response.")
    ev.add_argument("--cache-dir", default="gguf_models", help="Where .gguf models are converted (once).")


def _causal_lm(source: str, cache_dir: str) -> tuple[Any, Any]:
    from hf_distill.gguf import convert_gguf, is_gguf
    from hf_distill.loading import load_model
    from hf_distill.tasks import Task

    return load_model(convert_gguf(source, cache_dir) if is_gguf(source) else source, Task.CAUSAL_LM)


def _evaluate(args: argparse.Namespace) -> None:
    import json

    from hf_distill.data import load_table
    from hf_distill.llm_eval import evaluate_generation

    if args.output and not Path(args.output).expanduser().resolve().parent.is_dir():
        raise ValueError(f"--output {args.output!r}: its folder does not exist; create it first (nothing was run).")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}.")
    rows = load_table(args.data)
    if args.limit is not None:
        rows = rows.select(range(min(args.limit, len(rows))))
    model, tokenizer = _causal_lm(args.model, args.cache_dir)
    if tokenizer is None:
        raise ValueError(f"{args.model!r} holds no tokenizer; the prompts are rendered with its chat template.")
    teacher = _causal_lm(args.teacher, args.cache_dir)[0] if args.teacher else None
    result = evaluate_generation(
        model,
        tokenizer,
        rows,
        teacher,
        prompt_column=args.prompt_column,
        response_column=args.response_column,
        system_prompt=args.system_prompt,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        num_samples=args.num_samples,
    )
    ppl = "n/a" if result.teacher_perplexity is None else f"{result.teacher_perplexity:.2f}"
    print(f"ROUGE-L {result.rouge_l:.2f} on {result.num_rows} rows; teacher perplexity of the responses {ppl}")
    for sample in result.samples:
        print(f"\n> {sample['prompt']}\nreference: {sample['reference']}\nresponse:  {sample['response']}")
    if args.output:
        Path(args.output).write_text(json.dumps(result.to_dict(), indent=1))
        print(f"\nwrote {args.output}")


def _generate(args: argparse.Namespace) -> None:
    from hf_distill.data import load_table
    from hf_distill.generation import generate_responses
    from hf_distill.gguf import convert_gguf, is_gguf
    from hf_distill.loading import load_model
    from hf_distill.tasks import Task

    if Path(args.output_dir).exists():
        raise ValueError(f"{args.output_dir!r} exists; choose a new folder (nothing was generated).")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}.")
    prompts = load_table(args.data)
    if args.limit is not None:
        prompts = prompts.select(range(min(args.limit, len(prompts))))
    source = args.teacher
    if is_gguf(source):
        source = convert_gguf(source, Path(args.output_dir).resolve().parent / "gguf_teacher")
    teacher, tokenizer = load_model(source, Task.CAUSAL_LM)
    if tokenizer is None:
        raise ValueError(f"{args.teacher!r} holds no tokenizer; the prompts are rendered with its chat template.")
    options = ("prompt_column", "system_prompt", "max_new_tokens", "batch_size", "do_sample", "temperature", "top_p")
    generated = generate_responses(
        teacher,
        tokenizer,
        prompts,
        top_k=args.top_k,
        seed=args.seed,
        save_path=args.output_dir,
        **{name: getattr(args, name) for name in options},
    )
    print(f"wrote {len(generated)} teacher responses to {args.output_dir}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Our progress at INFO; the exporters' and optimizers' chatter only when it is a warning.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hf_distill").setLevel(logging.INFO)
    previous = _terminate_as_interrupt()
    try:
        if args.command in ("run", "distill", "push"):
            _pipeline(args, argv)
        elif args.command == "export":
            _export(args)
        elif args.command == "generate":
            _generate(args)
        elif args.command == "evaluate":
            _evaluate(args)
        else:
            _bench(args)
    except (ValueError, OSError) as err:  # user errors and unreadable files: a clear message, no traceback
        # Our ValueErrors are one line (a failed gate adds its table); an OSError's text may span lines.
        message = str(err) if isinstance(err, ValueError) else " ".join(f"{type(err).__name__}: {err}".split())
        print(f"hf-distill {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or `kill`: the atomic writers have removed their staging folders by now
        print(f"hf-distill {args.command}: interrupted; no half-written output was left.", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _terminate_as_interrupt() -> Any:
    """SIGTERM (`kill PID`, a scheduler's stop) raised as KeyboardInterrupt, as Ctrl-C is: Python's default would
    end the process at once, skipping the clean-up of staging folders and leaving child processes (onnxruntime-genai's
    builder) running. Returns the previous handler."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        return signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (an embedding application): leave signals alone
        return signal.getsignal(signal.SIGTERM)


def _pipeline(args: argparse.Namespace, argv: list[str] | None) -> None:
    import yaml

    from hf_distill.pipeline import Pipeline, load_pipeline_config
    from hf_distill.pipeline.stage_keys import COMMAND_STAGES

    overrides = list(args.overrides) + (["push.enabled=true"] if args.command == "push" else [])
    try:
        config = load_pipeline_config(args.config, overrides)
    except yaml.YAMLError as err:  # a --set value that is not YAML (the config file's own errors are ValueErrors)
        reason = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"A --set value is not valid YAML ({reason}); quote strings, e.g. --set key='a b'.") from err
    stages = COMMAND_STAGES[args.command]
    if args.command == "run" and args.stages:
        stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    Pipeline(config, force=args.force, command=_command_line(argv)).run(stages)


def _export(args: argparse.Namespace) -> None:
    from hf_distill.data import load_table
    from hf_distill.export import export_onnx, variant_table

    data = load_table(args.data)
    calibration = load_table(args.calibration_data) if args.calibration_data else None
    report = export_onnx(
        args.model_dir,
        args.output_dir,
        variants=[v for v in args.variants.split(",") if v] if args.variants is not None else None,
        validation_data=data,
        calibration_data=calibration,
        text_column=args.text_column,
        text_pair_column=None if args.text_pair_column.lower() == "none" else args.text_pair_column,
        label_column=args.label_column,
        num_validation=args.num_validation,
        num_calibration=args.num_calibration,
        max_length=args.max_length,
        max_metric_drop=args.max_metric_drop,
        fail_on_gate=not args.allow_failed,
        overwrite=args.force,
        engine=args.engine,
        min_greedy_agreement=args.min_greedy_agreement,
        num_prompts=args.num_prompts,
        block_size=args.block_size,
        accuracy_level=args.accuracy_level,
    )
    print("\n" + variant_table(report["variants"], report["reference"]["metric"]))
    cache = "with a KV cache" if report["kv_cache"] else "without a KV cache"
    print(f"\nexporter: {report['engine']}, {cache} ({report['engine_reason']})")
    print(f"wrote {args.output_dir}")


def _bench(args: argparse.Namespace) -> None:
    from hf_distill.edge_genai import is_genai_export

    variants = args.variants.split(",") if args.variants else None
    if Path(args.export_dir).is_dir() and is_genai_export(args.export_dir):
        from hf_distill.export.bench_llm import benchmark_llm

        benchmark_llm(
            args.export_dir,
            student=args.student,
            teacher=args.teacher,
            variants=variants,
            prompt_lens=args.seq_lens or [128, 512],
            batch_sizes=args.batch_sizes or [1, 4],
            new_tokens=args.new_tokens,
            runs=args.runs or 3,
            threads=args.threads,
            output_dir=args.output_dir,
        )
        return
    from hf_distill.export import benchmark

    benchmark(
        args.export_dir,
        student=args.student,
        teacher=args.teacher,
        teacher_metric=args.teacher_metric,
        variants=variants,
        batch_sizes=args.batch_sizes or [1, 8],
        seq_lens=args.seq_lens or [64, 128],
        warmup=args.warmup,
        runs=args.runs or 30,
        threads=args.threads,
        output_dir=args.output_dir,
    )


if __name__ == "__main__":
    sys.exit(main())
