"""`benchmark_llm`: time to first token, decode speed, peak memory and size of a decoder-LM export against PyTorch.

Rows: PyTorch eager fp32 ``generate`` (with its KV cache) for the teacher and the student folders, and every
onnxruntime-genai variant of the export. Each engine runs in its own spawned process so that its peak RSS is its own.

- ``ttft_ms`` at each prompt length (batch 1): prefill plus the first generated token, median of ``runs``.
- ``decode_tokens_per_s`` at each batch size: ``batch × new tokens / time``, after a 16-token prompt, the first token
  excluded (that is prefill), exactly ``new_tokens`` generated (EOS suppressed by a minimum length).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from hf_distill.engine_timing import measure_llm_engine
from hf_distill.export.genai import folder_size


def _in_fresh_process(spec: dict[str, Any]) -> dict[str, Any]:
    """Raises: ValueError: the engine could not load or run the model (one line: which folder, what failed)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(measure_llm_engine, spec).result()
        except Exception as err:  # onnxruntime-genai and torch raise their own types; the run is what failed
            reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
            raise ValueError(f"Cannot run {spec['engine']} on {spec['path']} ({reason}).") from err


def _folder_vocab(folder: Path) -> int:
    config = json.loads((folder / "config.json").read_text())
    return int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size") or 1000)


def _check_variant(folder: Path) -> int:
    """The variant folder's vocabulary size; its decoder graph parsed first, so a corrupt file fails before any run.

    Raises:
        ValueError: genai_config.json or the ONNX graph is missing, truncated or invalid.
    """
    from hf_distill.export.bench import check_onnx_file

    try:
        config = json.loads((folder / "genai_config.json").read_text())
        graph = config["model"]["decoder"]["filename"]
        vocab = int(config["model"]["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{folder / 'genai_config.json'} is missing or invalid ({type(err).__name__}).") from err
    check_onnx_file(folder / graph)
    return vocab


def benchmark_llm(
    export_dir: str | os.PathLike,
    *,
    student: str | os.PathLike | None = None,
    teacher: str | os.PathLike | None = None,
    variants: Sequence[str] | None = None,
    prompt_lens: Sequence[int] = (128, 512),
    batch_sizes: Sequence[int] = (1, 4),
    new_tokens: int = 64,
    runs: int = 3,
    threads: int | None = None,
    output_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Benchmark a decoder-LM export folder (``export_llm``); writes ``bench.json``, ``bench.md``, ``bench.png``.

    Raises:
        ValueError: not a decoder-LM export, unknown variants, non-positive sizes, missing PyTorch folders.
    """
    from hf_distill.export.bench import machine_info

    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise ValueError(f"{str(export_dir)!r} does not exist: pass a folder written by `hf-distill export`.")
    manifest_path = export_dir / "hf_distill_manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{manifest_path} is not valid JSON ({err}); export again.") from err
    if manifest.get("format") != "hf_distill-genai/1":
        raise ValueError(f"{str(export_dir)!r} is not a decoder-LM export (hf_distill-genai/1 manifest missing).")
    chosen = list(variants or manifest["variants"])
    missing = [v for v in chosen if v not in manifest["variants"]]
    if missing:
        raise ValueError(f"Variants {missing} are not in {export_dir}; available: {sorted(manifest['variants'])}.")
    if min(prompt_lens) < 1 or min(batch_sizes) < 1 or new_tokens < 2 or runs < 1:
        raise ValueError("prompt lengths, batch sizes and runs must be >= 1 and new_tokens >= 2.")
    vocabs = [_check_variant(export_dir / manifest["variants"][v]) for v in chosen]
    folders = [Path(f) for f in (teacher, student) if f is not None]
    if not vocabs:  # no exported variant to time (all failed their gate): the prompts must fit the PyTorch models
        vocabs = [_folder_vocab(f) for f in folders if (f / "config.json").is_file()] or [1000]
    vocab = min(vocabs)
    common = {
        "prompt_lens": list(prompt_lens),
        "batch_sizes": list(batch_sizes),
        "new_tokens": new_tokens,
        "runs": runs,
        "threads": threads,
        "vocab": vocab,
    }
    specs = []
    for name, folder in (("teacher", teacher), ("student", student)):
        if folder is not None:
            if not (Path(folder) / "config.json").is_file():
                raise ValueError(f"The {name} folder {str(folder)!r} holds no saved model (config.json missing).")
            size = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
            specs.append(({"engine": "pytorch", "path": str(folder), **common}, f"{name}_fp32", size))
    for variant in chosen:
        folder = export_dir / manifest["variants"][variant]
        specs.append(({"engine": "onnxruntime-genai", "path": str(folder), **common}, variant, folder_size(folder)))
    rows = []
    for spec, variant, size in specs:
        print(f"[bench] {spec['engine']} {variant} ...", flush=True)
        rows.append({"engine": spec["engine"], "variant": variant, "size_mb": size / 1e6, **_in_fresh_process(spec)})
    result = {"machine": machine_info(threads), "rows": rows, "new_tokens": new_tokens, "runs": runs}
    out = Path(output_dir) if output_dir is not None else export_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    (out / "bench.md").write_text(to_markdown(result))
    plot(rows, out / "bench.png")
    print(to_markdown(result))
    return result


def to_markdown(result: dict[str, Any]) -> str:
    m, rows = result["machine"], result["rows"]
    lens = list(rows[0]["ttft_ms"]) if rows else []
    batches = list(rows[0]["decode_tokens_per_s"]) if rows else []
    header = ["engine", "variant", *[f"ttft_ms@{n}" for n in lens], *[f"tokens_per_s@b{b}" for b in batches]]
    lines = [
        f"Machine: {m['cpu']} ({m['logical_cpus']} logical CPUs; flags: {', '.join(m['cpu_flags']) or 'none'}); "
        f"{result['new_tokens']} new tokens, median of {result['runs']} runs.",
        "",
        "| " + " | ".join([*header, "peak_rss_mb", "size_mb"]) + " |",
        "|" + "---|" * (len(header) + 2),
    ]
    for r in rows:
        cells = [r["engine"], r["variant"], *[f"{r['ttft_ms'][n]:.1f}" for n in lens]]
        cells += [f"{r['decode_tokens_per_s'][b]:.1f}" for b in batches]
        lines.append("| " + " | ".join([*cells, f"{r['peak_rss_mb']:.0f}", f"{r['size_mb']:.1f}"]) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Decode tokens/s (batch 1) against size on disk, one labelled point per engine/variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        speed = next(iter(r["decode_tokens_per_s"].values()))
        ax.scatter(r["size_mb"], speed, s=50)
        ax.annotate(
            f"{r['variant']} ({r['engine']})",
            (r["size_mb"], speed),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("decode tokens/s, batch 1")
    ax.set_title("Decode speed against size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
