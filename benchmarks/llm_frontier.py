"""The quality/speed frontier of distilled LLM students: ROUGE-L (from `recipes/chat_distill.py` runs) against int4
decode tokens/s (from `benchmarks/llm_speed.py`), one point per student, the teacher as the reference.

    python benchmarks/llm_frontier.py --speed runs/llm_frontier/llm_speed.json \\
        --run kd6=runs/chat/kd6 --run kd8=runs/chat/kd8 --run kd10=runs/smollm2_chat --out runs/llm_frontier

Each --run NAME=FOLDER is a chat_distill output folder (its results.json: the student's ROUGE-L, and the teacher's
when that run evaluated it); NAME must be a model name of the speed run (`--student NAME=FOLDER/student` there).
Prints a Markdown table and writes OUT/frontier.png and OUT/frontier.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed", required=True, help="llm_speed.json of one benchmarks/llm_speed.py run.")
    parser.add_argument("--run", action="append", required=True, help="NAME=chat_distill output folder.")
    parser.add_argument("--out", default="runs/llm_frontier")
    return parser.parse_args()


def frontier(speed: dict[str, Any], runs: dict[str, Path]) -> list[dict[str, Any]]:
    """One row per model: layers, int4 decode tokens/s (batch 1), ROUGE-L and the teacher's perplexity of its
    answers. The teacher's quality comes from the first run that evaluated it."""
    int4 = {r["model"]: r for r in speed["rows"] if r["engine"] == "onnxruntime-genai"}
    rows, teacher = [], None
    for name, folder in runs.items():
        evaluation = json.loads((folder / "results.json").read_text())["evaluation"]
        teacher = teacher or evaluation.get("teacher")
        if name not in int4:
            raise SystemExit(f"{name!r} is not a model of the speed run (models: {sorted(int4)}).")
        rows.append({"model": name, **_point(int4[name], evaluation["student"])})
    if teacher is None:
        raise SystemExit("no run evaluated the teacher (chat_distill --eval_models teacher,...): no reference.")
    return [{"model": "teacher", **_point(int4["teacher"], teacher)}, *rows]


def _point(timed: dict[str, Any], quality: dict[str, Any]) -> dict[str, Any]:
    return {
        "layers": timed["layers"],
        "decode_tokens_per_s": timed["decode_tokens_per_s"],
        "size_mb": timed["size_mb"],
        "rouge_l": quality["rouge_l"],
        "teacher_perplexity": quality["teacher_perplexity"],
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    teacher = rows[0]
    lines = [
        "| model | layers | ROUGE-L | % of teacher | teacher ppl | int4 decode tok/s (b1) | × teacher | MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = 100 * r["rouge_l"] / teacher["rouge_l"]
        speedup = (r["decode_tokens_per_s"] or 0) / (teacher["decode_tokens_per_s"] or float("inf"))
        lines.append(
            f"| {r['model']} | {r['layers']} | {r['rouge_l']:.2f} | {share:.0f} % | {r['teacher_perplexity']:.2f} | "
            f"{r['decode_tokens_per_s'] or 0:.1f} | {speedup:.2f} | {r['size_mb']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["decode_tokens_per_s"], r["rouge_l"], color="tab:red" if r["model"] == "teacher" else "tab:blue")
        ax.annotate(f"{r['model']} ({r['layers']} layers)", (r["decode_tokens_per_s"], r["rouge_l"]), fontsize=8)
    ax.set_xlabel("int4 decode tokens/s, batch 1 (onnxruntime-genai)")
    ax.set_ylabel("ROUGE-L on held-out Self-Instruct rows")
    ax.set_title("Distilled students: quality against speed")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = _arguments()
    runs = {}
    for given in args.run:
        name, _, folder = given.partition("=")
        if not folder:
            raise SystemExit(f"--run takes NAME=FOLDER, got {given!r}")
        runs[name] = Path(folder)
    rows = frontier(json.loads(Path(args.speed).read_text()), runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "frontier.json").write_text(json.dumps(rows, indent=2))
    plot(rows, out / "frontier.png")
    print(markdown(rows))
    print(f"wrote {out / 'frontier.png'} and {out / 'frontier.json'}")


if __name__ == "__main__":
    main()
