"""Publishing a run: the Hub model card, the upload folder (student, ONNX, edge runner) and the push."""

from __future__ import annotations

import json
import os
import shutil
from importlib.resources import files
from pathlib import Path
from typing import Any

from hf_distill.pipeline.config import PipelineConfig
from hf_distill.pipeline.report import collect, markdown
from hf_distill.pipeline.workspace import Workspace


def model_card(r: dict[str, Any], repo_id: str | None) -> str:
    """A Hub model card: what it is, how well it does, how fast, how to run it on a device, how to reproduce it."""
    t, s = r["teacher"], r["student"]
    best = next((e for e in r["export"] if e["variant"].startswith("int8") and e["passed"]), None)
    body = markdown(r).split("\n", 2)[2]  # the report without its title
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            "pipeline_tag: text-classification",
            "tags:",
            "- distillation",
            "- hf_distill",
            "- onnx",
            "---",
            "",
            f"# {repo_id or 'Distilled student'}",
            "",
            f"A {len(s['teacher_layers_copied'] or [])}-layer student distilled with "
            f"hf_distill from `{t['source']}` ({t['layers']} layers), which was fine-tuned on the "
            f"task first. It keeps the teacher's tokenizer and classes{_classes(r.get('labels'))}.",
            "",
            body,
            "",
            "## Run the ONNX model on a device",
            "",
            "The `onnx/` folder runs with onnxruntime, tokenizers and numpy only (no torch). With this repository's",
            "files (`edge_runner.py` is a copy of hf_distill's `hf_distill/edge.py`):",
            "",
            "```bash",
            "pip install -r requirements.txt   # onnxruntime, tokenizers, numpy",
            'python edge_runner.py onnx "a gripping , funny film"',
            "```",
            "",
            'Or, where hf_distill is installed: `hf-distill-edge onnx "a gripping , funny film"` '
            "(the same as `python -m hf_distill.edge`).",
            "",
            f"Default variant: `{best['variant'] if best else 'fp32'}`.",
            "",
            "## Use with transformers",
            "",
            "```python",
            "from transformers import pipeline",
            f"pipe = pipeline('text-classification', model='{repo_id or '.'}')",
            "```",
            "",
        ]
    )


def _classes(labels: list[str] | None) -> str:
    return f" ({len(labels)}: {', '.join(labels)})" if labels else ""


def build_upload_folder(
    ws: Workspace, config: PipelineConfig, command: str, infos: dict[str, dict[str, Any]], dest: Path
) -> Path:
    """The folder pushed to the Hub: the student, `onnx/` (passing variants), `edge_runner.py` (+ `edge_genai.py`),
    README.md card."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(ws.student_model_dir, dest, ignore=shutil.ignore_patterns("training_args.bin", "checkpoint*"))
    onnx_dir = ws.onnx_dir
    if onnx_dir.is_dir():
        manifest = json.loads((onnx_dir / "hf_distill_manifest.json").read_text())
        keep = set(manifest["variants"].values())
        shutil.copytree(
            onnx_dir,
            dest / "onnx",
            ignore=lambda _d, names: [n for n in names if n.endswith(".onnx") and n not in keep],
        )
        # The runner is a module of the installed package (torch-free, self-contained): ship its source as a file.
        (dest / "edge_runner.py").write_text(files("hf_distill").joinpath("edge.py").read_text())
        # edge_runner.py hands decoder-LM exports (KV cache) to edge_genai.py found beside it.
        (dest / "edge_genai.py").write_text(files("hf_distill").joinpath("edge_genai.py").read_text())
        (dest / "requirements.txt").write_text(files("hf_distill").joinpath("edge_requirements.txt").read_text())
    (dest / "README.md").write_text(model_card(collect(config, command, infos), config.push.repo_id))
    return dest


def push_folder(folder: Path, repo_id: str, private: bool = True, token: str | None = None) -> str:
    """Create the repo (if needed) and upload ``folder``. The token comes from the argument, HF_TOKEN or the cached
    login, and is never printed or logged."""
    from huggingface_hub import HfApi

    api = HfApi(token=token or os.environ.get("HF_TOKEN"))
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload hf_distill student")
    return str(getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}")
