"""Run an hf_distill ONNX export on a device: needs only onnxruntime, tokenizers and numpy (no torch, no transformers).

    python edge_runner.py MODEL_DIR "a gripping , funny film" "dull"          # classify texts
    python edge_runner.py MODEL_DIR --pair "A man is eating." "Someone eats."  # a sentence pair (repeatable)
    printf 'first\tsecond\n' | python edge_runner.py MODEL_DIR                  # stdin: a tab splits a pair
    python edge_runner.py MODEL_DIR --generate "ROMEO:" --max-new-tokens 20   # greedy generation (causal LM)
    python edge_runner.py MODEL_DIR --variant fp32 --threads 1 "text"
    python edge_runner.py LLM_DIR --chat                                       # decoder LM with a KV cache

MODEL_DIR is the folder written by `hf-distill export` (it holds hf_distill_manifest.json, tokenizer.json and the
.onnx files). Output: one JSON object per line (classification: label, label_id, score, probabilities; regression
heads: value). A decoder-LM export with a KV cache (manifest format hf_distill-genai/1, or a bare folder with
genai_config.json) is handed to edge_genai.py (onnxruntime-genai and numpy; streaming, chat template, --chat).

Tokenization follows the manifest's rule (the same one the export wrote into tokenizer.json): pad each batch to its
longest row on the right, truncate to `max_length` tokens (longest text of a pair first), and feed the encoding's
own attention mask and token type ids.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

if TYPE_CHECKING:  # imported where a classifier export is loaded: a decoder-LM device needs no tokenizers package
    from tokenizers import Tokenizer

MANIFEST = "hf_distill_manifest.json"
Text = str | tuple[str, str]  # one text, or a sentence pair


def _fail(message: str) -> SystemExit:
    return SystemExit(f"error: {message}")


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
        self.manifest = self._read_manifest()
        variants = self.manifest["variants"]
        self.variant = variant or self.manifest.get("default_variant") or next(iter(variants), None)
        if self.variant not in variants:
            raise _fail(f"variant {self.variant!r} is not in this export; available: {sorted(variants)}.")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        model_path = self.folder / variants[self.variant]
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises several internal exception types for a bad file
            raise _fail(
                f"cannot load {model_path} ({err.__class__.__name__}): the file is missing, "
                "truncated or corrupted. Copy the export folder again or re-run `hf-distill export`."
            ) from err
        self.max_length = int(self.manifest["max_length"])
        self.tokenizer = self._load_tokenizer()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.prompt = self._load_prompt(prompt)

    def _read_manifest(self) -> dict:
        path = self.folder / MANIFEST
        if not path.is_file():
            raise _fail(f"{path} not found; pass a folder written by `hf-distill export`.")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise _fail(f"{path} is not valid JSON ({err}); copy the export folder again.") from err
        missing = [k for k in ("task", "variants", "max_length") if not isinstance(manifest, dict) or k not in manifest]
        if missing:
            raise _fail(f"{path} lacks {missing}; pass a folder written by `hf-distill export`.")
        return manifest

    def _load_tokenizer(self) -> Tokenizer:
        """The exported tokenizer with the manifest's padding/truncation rule applied (see the module docstring)."""
        if not self.manifest.get("tokenizer"):
            raise _fail("this export has no tokenizer.json; export from a folder that holds the tokenizer.")
        path = self.folder / self.manifest["tokenizer"]
        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            raise _fail("this export needs the tokenizers package: pip install tokenizers") from err

        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a plain Exception for a bad file
            raise _fail(f"cannot load {path} ({err}); copy the export folder again.") from err
        # Exports made before the rule was written down: pad with the manifest's id, truncate at max_length.
        rule = self.manifest.get("tokenization") or {
            "pad_token_id": int(self.manifest.get("pad_token_id") or 0),
            "pad_token": "[PAD]",
            "pad_type_id": 0,
            "max_length": self.max_length,
        }
        self._rule = rule
        self._apply_rule(tokenizer)
        return tokenizer

    def _apply_rule(self, tokenizer: Tokenizer) -> None:
        rule = self._rule
        tokenizer.enable_padding(
            direction="right", pad_id=rule["pad_token_id"], pad_type_id=rule["pad_type_id"], pad_token=rule["pad_token"]
        )
        tokenizer.enable_truncation(int(rule["max_length"]), strategy="longest_first", direction="right")

    def _load_prompt(self, prompt: str | os.PathLike | None) -> np.ndarray | None:
        """The soft prompt fed to a prompt-as-input export (one backbone, one .npy file per task)."""
        info = self.manifest.get("prompt") or {}
        if info.get("mode") != "input":
            if prompt is not None:
                raise _fail(
                    "--prompt needs an export made with prompt_mode='input'; this one has "
                    f"{info.get('mode') or 'no'} prompt."
                )
            return None
        path = Path(prompt) if prompt is not None else self.folder / info["default_file"]
        if not path.is_file():
            raise _fail(f"prompt file {path} not found.")
        try:
            embeds = np.load(path).astype(np.float32)
        except Exception as err:  # a truncated or foreign file
            raise _fail(f"cannot read prompt file {path} ({err.__class__.__name__}: {err}).") from err
        if embeds.ndim != 2 or embeds.shape[0] != info["num_virtual_tokens"]:
            raise _fail(
                f"{path} holds embeddings of shape {embeds.shape}; this backbone was exported for "
                f"{info['num_virtual_tokens']} virtual tokens."
            )
        return embeds

    def _feed(self, texts: list[Text]) -> dict[str, np.ndarray]:
        encodings = self.tokenizer.encode_batch(texts)
        for text, enc in zip(texts, encodings, strict=True):
            if enc.overflowing:
                first = text if isinstance(text, str) else text[0]
                print(
                    f"warning: input is longer than this export's {self.max_length} tokens "
                    f"(positions left after any soft prompt); truncated: {first[:40]!r}...",
                    file=sys.stderr,
                )
        feed = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
            "prompt_embeds": self.prompt,
        }
        return {name: feed[name] for name in self.input_names}

    def logits(self, texts: list[Text]) -> np.ndarray:
        """``[batch, num_labels]`` (or per-token) logits of texts or ``(first, second)`` pairs."""
        return self.session.run(["logits"], self._feed(texts))[0]

    def classify(self, texts: list[Text]) -> list[dict]:
        """One result per text or ``(first, second)`` pair: label and probabilities, or ``value`` for regression."""
        if self.manifest["task"] != "sequence-classification":
            raise _fail(
                f"classify needs a sequence-classification export, this one is "
                f"{self.manifest['task']}; use --generate for causal LMs."
            )
        logits = self.logits(texts).astype(np.float64)
        rows = [{"text": t} if isinstance(t, str) else {"text": t[0], "text_pair": t[1]} for t in texts]
        if self.manifest.get("problem_type") == "regression":
            return [{**row, "value": float(v[0])} for row, v in zip(rows, logits, strict=True)]
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        id2label = self.manifest.get("id2label", {})
        return [
            {
                **row,
                "label": id2label.get(str(int(p.argmax())), str(int(p.argmax()))),
                "label_id": int(p.argmax()),
                "score": float(p.max()),
                "probabilities": p.round(6).tolist(),
            }
            for row, p in zip(rows, probs, strict=True)
        ]

    def generate(self, prompt: str, max_new_tokens: int = 32) -> str:
        """Greedy decoding; re-runs the last ``max_length`` tokens each step (the export has no KV cache)."""
        if self.manifest["task"] != "causal-lm":
            raise _fail("--generate needs a causal-lm export.")
        self.tokenizer.no_truncation()  # keep the prompt's end: the window below drops its start instead
        try:
            ids = self.tokenizer.encode(prompt).ids
        finally:
            self._apply_rule(self.tokenizer)
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


def read_inputs(texts: list[str], pairs: list[list[str]] | None, stdin: object) -> list[Text]:
    """Texts and ``--pair`` pairs from the command line; else stdin lines (a tab splits a line into a pair)."""
    inputs: list[Text] = [*texts, *(tuple(p) for p in pairs or [])]
    if inputs:
        return inputs
    lines = [line.rstrip("\r\n") for line in stdin if line.strip()]
    return [tuple(line.split("\t", 1)) if "\t" in line else line for line in lines]


# Options of decoder-LM exports with a KV cache, which edge_genai.py runs (with --generate, --variant, --threads,
# --max-new-tokens and one prompt), as parsed here: (flag, attribute, default).
_LLM_OPTIONS = (
    ("--chat", "chat", False),
    ("--system", "system", None),
    ("--do-sample", "do_sample", False),
    ("--temperature", "temperature", None),
    ("--top-p", "top_p", None),
    ("--top-k", "top_k", None),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("texts", nargs="*", help="Texts to classify (decoder-LM exports: the one prompt).")
    parser.add_argument(
        "--pair",
        nargs=2,
        action="append",
        metavar=("FIRST", "SECOND"),
        help="A sentence pair to classify (repeatable).",
    )
    parser.add_argument("--variant", default=None, help="Variant to run (default: the manifest's default_variant).")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads.")
    parser.add_argument("--generate", default=None, help="Prompt for generation (causal-LM exports).")
    parser.add_argument("--prompt", default=None, help="Soft-prompt .npy file (exports with a prompt input).")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="Generated tokens (default 32; LLMs 128).")
    llm = parser.add_argument_group("decoder-LM exports with a KV cache (onnxruntime-genai; see edge_genai.py)")
    llm.add_argument("--chat", action="store_true", help="Interactive chat: one user message per stdin line.")
    llm.add_argument("--system", default=None, help="System prompt.")
    llm.add_argument("--do-sample", action="store_true", help="Sample (default: greedy).")
    llm.add_argument("--temperature", type=float, default=None)
    llm.add_argument("--top-p", type=float, default=None)
    llm.add_argument("--top-k", type=int, default=None)
    return parser


def is_genai_export(folder: Path) -> bool:
    """A decoder-LM export for onnxruntime-genai: its manifest says so, or a bare variant folder (genai_config.json)."""
    path = folder / MANIFEST
    if not path.is_file():
        return (folder / "genai_config.json").is_file()
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False  # EdgeModel reports the broken manifest
    return isinstance(manifest, dict) and manifest.get("format") == "hf_distill-genai/1"


def _run_genai(argv: list[str]) -> None:
    """Hand a decoder-LM export to the streaming runner (hf_distill/edge_genai.py, or edge_genai.py beside this file
    when it was copied on its own)."""
    try:
        from hf_distill import edge_genai
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        try:
            import edge_genai
        except ImportError as err:
            raise _fail("a decoder-LM export needs edge_genai.py beside this runner (copy it too).") from err
    edge_genai.main(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_intermixed_args(argv)
    folder = Path(args.model_dir)
    if not folder.is_dir():
        raise _fail(f"{folder} does not exist; pass a folder written by `hf-distill export`.")
    if is_genai_export(folder):
        if args.pair or args.prompt or len(args.texts) > 1:
            raise _fail("a decoder-LM export takes one prompt (or --chat); --pair and --prompt are for classifiers.")
        _run_genai(argv)
        return
    llm_only = [flag for flag, name, default in _LLM_OPTIONS if getattr(args, name) != default]
    if llm_only:
        raise _fail(
            f"{', '.join(llm_only)} {'needs' if len(llm_only) == 1 else 'need'} a decoder-LM export with a KV cache "
            f"(onnxruntime-genai); {folder} is not one. A classifier takes texts; a causal LM the builder supports "
            "gets a KV cache from `hf-distill export` (--engine auto); others (GPT-2, ...) run here with --generate."
        )
    model = EdgeModel(args.model_dir, args.variant, args.threads, args.prompt)
    if args.generate is not None:
        text = model.generate(args.generate, args.max_new_tokens or 32)
        print(json.dumps({"prompt": args.generate, "text": text}))
        return
    inputs = read_inputs(args.texts, args.pair, sys.stdin)
    if not inputs:
        raise _fail("no input: pass texts, --pair FIRST SECOND, or lines on stdin.")
    for row in model.classify(inputs):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
