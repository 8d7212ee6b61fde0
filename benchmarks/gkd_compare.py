"""hf_distill's `DistillationTrainer` against TRL's `GKDTrainer` (`trl.experimental.gkd`) on causal-LM distillation.

Off-policy GKD (`lmbda=0`, no sequence-level KD) is supervised distillation with the generalized JSD on the
dataset's tokens, which is what `DistillationTrainer(kd_loss="jsd", alpha=1)` computes. Both trainers get the same
teacher, the same 2-layer student cut from it with `create_student`, the same tinyshakespeare token blocks (the
causal-LM recipe's split), batch, steps, learning-rate schedule, seed and JSD beta; the only difference is the
trainer. GKD applies no temperature to its loss, so hf_distill runs at T=1 (no T² factor either).

Each (trainer, round) runs in a freshly spawned process; the order alternates per round so machine drift hits both
alike. Reported: training tokens/s (from Trainer's own `train_runtime`), held-out perplexity of the trained student,
the logged training losses (equal objectives give equal curves), and peak RSS.

    pip install "trl==1.16.*"   # not a dependency of hf_distill: only this benchmark needs it
    python recipes/causal_lm.py recipes/configs/shakespeare_lm.yaml           # teacher + tokenizer in runs/shakespeare
    python benchmarks/gkd_compare.py --run-dir runs/shakespeare --steps 100 --rounds 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import resource
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "causal_lm.py"
ENGINES = ("hf_distill", "trl_gkd")


def _recipe():
    """The causal-LM recipe's data split and perplexity, so both trainers see exactly the recipe's blocks."""
    spec = importlib.util.spec_from_file_location("causal_lm_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _run(engine: str, run_dir: str, steps: int, batch: int, lr: float, beta: float, student_layers: int) -> dict:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, default_data_collator

    from hf_distill import DistillationConfig, DistillationTrainer, create_student

    recipe = _recipe()
    root = Path(run_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(root / "tokenizer")
    # The recipe's own record of its split, so the held-out set is the one its perplexities were measured on.
    recorded = json.loads((root / "results.json").read_text())
    block_size = recorded["block_size"]
    data = recipe.blocks(tokenizer, str(recipe.CORPUS), block_size)
    held_out = data["test"].select(range(recorded["held_out_blocks"]))
    teacher = LlamaForCausalLM.from_pretrained(root / "teacher")
    torch.manual_seed(0)
    student = create_student(teacher, num_layers=student_layers)
    common = dict(
        output_dir=str(root / f"bench_{engine}"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=steps // 10,
        weight_decay=0.0,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        use_cpu=True,
    )
    if engine == "hf_distill":
        args = DistillationConfig(kd_loss="jsd", jsd_beta=beta, alpha=1.0, temperature=1.0, **common)
        trainer = DistillationTrainer(
            model=student, teacher=teacher, args=args, train_dataset=data["train"], data_collator=default_data_collator
        )
    else:
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        # SFTConfig turns on gradient checkpointing and bf16 by default; both off to match the other run.
        args = GKDConfig(
            lmbda=0.0,
            beta=beta,
            seq_kd=False,
            gradient_checkpointing=False,
            bf16=False,
            max_length=block_size,
            **common,
        )
        trainer = GKDTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=data["train"],
            processing_class=tokenizer,
            data_collator=default_data_collator,
        )
    metrics = trainer.train().metrics
    return {
        "engine": engine,
        "train_runtime_s": metrics["train_runtime"],
        "tokens_per_s": steps * batch * block_size / metrics["train_runtime"],
        "losses": [log["loss"] for log in trainer.state.log_history if "loss" in log],
        "held_out_perplexity": recipe.perplexity(student, held_out),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/shakespeare", help="causal_lm.py output (teacher/, tokenizer/).")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.5, help="JSD beta for both trainers.")
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default="runs/benchmarks/gkd_compare.json")
    args = parser.parse_args()
    if importlib.util.find_spec("trl") is None:
        parser.error('TRL is not installed; this benchmark needs it: pip install "trl==1.16.*"')
    for needed in ("teacher/model.safetensors", "tokenizer/tokenizer.json", "results.json"):
        if not (Path(args.run_dir) / needed).is_file():
            parser.error(
                f"{args.run_dir}/{needed} is missing: run recipes/causal_lm.py with --output_dir {args.run_dir}"
            )
    results: dict[str, list[dict]] = {e: [] for e in ENGINES}
    context = multiprocessing.get_context("spawn")
    for round_index in range(args.rounds):
        order = ENGINES if round_index % 2 == 0 else ENGINES[::-1]
        for engine in order:
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                run = pool.submit(
                    _run,
                    engine,
                    args.run_dir,
                    args.steps,
                    args.batch,
                    args.learning_rate,
                    args.beta,
                    args.student_layers,
                ).result()
            results[engine].append(run)
            print({k: v for k, v in run.items() if k != "losses"}, flush=True)
    summary = {
        engine: {
            key: statistics.median(r[key] for r in results[engine])
            for key in ("tokens_per_s", "held_out_perplexity", "peak_rss_mb")
        }
        for engine in ENGINES
    }
    ratio = summary["hf_distill"]["tokens_per_s"] / summary["trl_gkd"]["tokens_per_s"]
    print(
        f"\n{args.steps} steps of {args.batch} x 128 tokens, JSD beta {args.beta}, "
        f"{args.student_layers}-layer student; medians of {args.rounds} rounds.\n\n"
        "| trainer | tokens/s | held-out perplexity | peak RSS MB | logged losses (round 1) |\n|---|---|---|---|---|"
    )
    for engine in ENGINES:
        losses = ", ".join(f"{x:.3f}" for x in results[engine][0]["losses"])
        s = summary[engine]
        print(
            f"| {engine} | {s['tokens_per_s']:.0f} | {s['held_out_perplexity']:.2f} | {s['peak_rss_mb']:.0f} | "
            f"{losses} |"
        )
    print(f"\ntokens/s ratio hf_distill / TRL GKD: {ratio:.3f}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"summary": summary, "ratio": ratio, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
