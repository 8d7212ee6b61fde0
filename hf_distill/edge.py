"""Run an hf_distill ONNX export on a device: needs only onnxruntime, tokenizers and numpy (no torch, no transformers).

    python edge_runner.py MODEL_DIR "a gripping , funny film" "dull"          # classify texts
    python edge_runner.py MODEL_DIR --generate "ROMEO:" --max-new-tokens 20   # greedy generation (causal LM)
    python edge_runner.py MODEL_DIR --variant fp32 --threads 1 "text"

MODEL_DIR is the folder written by `hf-distill export` (it holds hf_distill_manifest.json, tokenizer.json and the
.onnx files). Output: one JSON object per line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

MANIFEST = "hf_distill_manifest.json"


class EdgeModel:
    """An exported student, loaded for inference with onnxruntime."""

    def __init__(
        self,
        folder: str | os.PathLike,
        variant: str | None = None,
        threads: int | None = None,
        prompt: str | os.PathLike | None = None,
    ) -> None:
        self.folder = Path(folder)
        manifest_path = self.folder / MANIFEST
        if not manifest_path.is_file():
            raise SystemExit(f"error: {manifest_path} not found; pass a folder written by `hf-distill export`.")
        self.manifest = json.loads(manifest_path.read_text())
        variants = self.manifest["variants"]
        self.variant = variant or self.manifest.get("default_variant") or next(iter(variants), None)
        if self.variant not in variants:
            raise SystemExit(f"error: variant {self.variant!r} is not in this export; available: {sorted(variants)}.")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        model_path = self.folder / variants[self.variant]
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises several internal exception types for a bad file
            raise SystemExit(
                f"error: cannot load {model_path} ({err.__class__.__name__}): the file is missing, "
                "truncated or corrupted. Copy the export folder again or re-run `hf-distill export`."
            ) from err
        if not self.manifest.get("tokenizer"):
            raise SystemExit("error: this export has no tokenizer.json; export from a folder that holds the tokenizer.")
        self.tokenizer = Tokenizer.from_file(str(self.folder / self.manifest["tokenizer"]))
        self.max_length = int(self.manifest["max_length"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.prompt = self._load_prompt(prompt)

    def _load_prompt(self, prompt: str | os.PathLike | None) -> np.ndarray | None:
        """The soft prompt fed to a prompt-as-input export (one backbone, one .npy file per task)."""
        info = self.manifest.get("prompt") or {}
        if info.get("mode") != "input":
            if prompt is not None:
                raise SystemExit(
                    "error: --prompt needs an export made with prompt_mode='input'; this one has "
                    f"{info.get('mode') or 'no'} prompt."
                )
            return None
        path = Path(prompt) if prompt is not None else self.folder / info["default_file"]
        if not path.is_file():
            raise SystemExit(f"error: prompt file {path} not found.")
        embeds = np.load(path).astype(np.float32)
        if embeds.shape[0] != info["num_virtual_tokens"]:
            raise SystemExit(
                f"error: {path} holds {embeds.shape[0]} virtual tokens; this backbone was exported for "
                f"{info['num_virtual_tokens']}."
            )
        return embeds

    def _feed(self, texts: list[str]) -> dict[str, np.ndarray]:
        encodings = self.tokenizer.encode_batch(texts)
        for text, enc in zip(texts, encodings, strict=True):
            if len(enc.ids) > self.max_length:
                print(
                    f"warning: input is {len(enc.ids)} tokens, longer than this export's {self.max_length} "
                    f"(positions left after the soft prompt); truncated: {text[:40]!r}...",
                    file=sys.stderr,
                )
        width = min(max(len(e.ids) for e in encodings), self.max_length)
        pad = int(self.manifest.get("pad_token_id") or 0)

        def padded(rows: list[list[int]], value: int) -> np.ndarray:
            return np.array([r[:width] + [value] * (width - len(r[:width])) for r in rows], dtype=np.int64)

        feed = {
            "input_ids": padded([e.ids for e in encodings], pad),
            "attention_mask": padded([[1] * len(e.ids) for e in encodings], 0),
            "token_type_ids": padded([e.type_ids for e in encodings], 0),
            "prompt_embeds": self.prompt,
        }
        return {name: feed[name] for name in self.input_names}

    def logits(self, texts: list[str]) -> np.ndarray:
        return self.session.run(["logits"], self._feed(texts))[0]

    def classify(self, texts: list[str]) -> list[dict]:
        if self.manifest["task"] != "sequence-classification":
            raise SystemExit(
                f"error: classify needs a sequence-classification export, this one is "
                f"{self.manifest['task']}; use --generate for causal LMs."
            )
        logits = self.logits(texts).astype(np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        id2label = self.manifest.get("id2label", {})
        return [
            {
                "text": t,
                "label": id2label.get(str(int(p.argmax())), str(int(p.argmax()))),
                "label_id": int(p.argmax()),
                "score": float(p.max()),
                "probabilities": p.round(6).tolist(),
            }
            for t, p in zip(texts, probs, strict=True)
        ]

    def generate(self, prompt: str, max_new_tokens: int = 32) -> str:
        """Greedy decoding; re-runs the whole sequence each step (the export has no KV cache)."""
        if self.manifest["task"] != "causal-lm":
            raise SystemExit("error: --generate needs a causal-lm export.")
        ids = self.tokenizer.encode(prompt).ids
        eos = self.manifest.get("eos_token_id")
        for _ in range(max_new_tokens):
            window = ids[-self.max_length :]
            feed = {
                "input_ids": np.array([window], dtype=np.int64),
                "attention_mask": np.ones((1, len(window)), dtype=np.int64),
                "prompt_embeds": self.prompt,
            }
            next_id = int(self.session.run(["logits"], {k: feed[k] for k in self.input_names})[0][0, -1].argmax())
            ids.append(next_id)
            if eos is not None and next_id == eos:
                break
        return self.tokenizer.decode(ids)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("texts", nargs="*", help="Texts to classify.")
    parser.add_argument("--variant", default=None, help="Variant to run (default: the manifest's default_variant).")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads.")
    parser.add_argument("--generate", default=None, help="Prompt for greedy generation (causal-LM exports).")
    parser.add_argument("--prompt", default=None, help="Soft-prompt .npy file (exports with a prompt input).")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_intermixed_args(argv)
    model = EdgeModel(args.model_dir, args.variant, args.threads, args.prompt)
    if args.generate is not None:
        print(json.dumps({"prompt": args.generate, "text": model.generate(args.generate, args.max_new_tokens)}))
        return
    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for row in model.classify(texts):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
