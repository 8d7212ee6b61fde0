"""The chat-distillation comparison table (BENCHMARKS.md) from the `results.json` of each run folder.

Each ROW=FOLDER names a finished run of `recipes/chat_distill.py` or `benchmarks/chat_gkd_compare.py`; its
`evaluation` holds the scored models (ROUGE-L of greedy answers on the held-out rows, the teacher's perplexity of
them), `train` the training time, tokens/s and peak RSS. --refs adds rows from a JSON of evaluations only
(model name -> `evaluate_generation(...).to_dict()`), e.g. the teacher and an untrained cut.

    python benchmarks/chat_comparison.py --refs runs/chat/refs.json sft=runs/chat/sft fkl=runs/chat/fkl ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HEADER = (
    "| row | blocks | ROUGE-L | teacher ppl of its answers | training s | training tokens/s | peak RSS MB |\n"
    "|---|---|---|---|---|---|---|"
)


def _cell(value: Any, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def row(name: str, evaluation: dict, blocks: Any, train: dict | None = None) -> str:
    train = train or {}
    return (
        f"| {name} | {blocks} | {_cell(evaluation.get('rouge_l'))} | {_cell(evaluation.get('teacher_perplexity'))} "
        f"| {_cell(train.get('train_runtime'), 0)} | {_cell(train.get('tokens_per_s'), 1)} "
        f"| {_cell(train.get('peak_rss_mb'), 0)} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="ROW=FOLDER of a finished run (its results.json).")
    parser.add_argument("--refs", default=None, help="JSON of evaluations without training (teacher, cuts).")
    args = parser.parse_args()
    if not args.runs and not args.refs:
        parser.error("pass at least one ROW=FOLDER or --refs")
    missing = [p for p in [args.refs, *(r.partition("=")[2] for r in args.runs)] if p and not Path(p).exists()]
    if missing:
        parser.error(f"not found: {', '.join(missing)}")
    lines = [HEADER]
    if args.refs:
        for name, evaluation in json.loads(Path(args.refs).read_text()).items():
            if isinstance(evaluation, dict):
                lines.append(row(name, evaluation, "—"))
    for spec in args.runs:
        name, _, folder = spec.partition("=")
        if not folder:
            raise SystemExit(f"{spec!r}: pass ROW=FOLDER.")
        results = json.loads((Path(folder) / "results.json").read_text())
        blocks = len(results.get("kept_teacher_layers") or []) or "—"
        for model, evaluation in results.get("evaluation", {}).items():
            label = name if model == "student" else f"{name}: {model}"
            lines.append(row(label, evaluation, blocks, results["train"] if model == "student" else None))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
