"""Run an hf_distill decoder-LM export (KV cache, onnxruntime-genai) on a device: streams tokens, no torch.

    python edge_genai.py MODEL_DIR "What is the capital of France?"          # one answer, streamed
    python edge_genai.py MODEL_DIR --chat                                    # interactive chat (stdin)
    python edge_genai.py MODEL_DIR "Tell a story" --do-sample --temperature 0.8 --top-p 0.9 --max-new-tokens 64

MODEL_DIR is the folder written by `hf-distill export` for a decoder LM (hf_distill_manifest.json of format
hf_distill-genai/1 and one onnxruntime-genai folder per variant), or one variant folder copied on its own
(genai_config.json, model.onnx, tokenizer). Needs only onnxruntime-genai and numpy.
Also reachable as `hf-distill-edge MODEL_DIR --chat` where hf_distill is installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

MANIFEST = "hf_distill_manifest.json"
GENAI_FORMAT = "hf_distill-genai/1"
GENAI_CONFIG = "genai_config.json"


def _one_line(err: BaseException) -> str:
    """An onnxruntime-genai error (often several lines, with a C++ location) as one short line."""
    return " ".join(f"{type(err).__name__}: {err}".split())[:400]


def _manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise SystemExit(f"error: {path} is not valid JSON ({err}); copy the export folder again.") from err
    if not isinstance(manifest, dict):
        raise SystemExit(f"error: {path} is not an hf_distill manifest; copy the export folder again.")
    return manifest


def is_genai_export(folder: str | Path) -> bool:
    """A decoder-LM export: an hf_distill-genai/1 manifest, or one bare onnxruntime-genai variant folder."""
    folder = Path(folder)
    try:
        manifest = _manifest(folder)
    except SystemExit:  # an unreadable manifest: whoever loads the folder reports it
        return False
    return (manifest or {}).get("format") == GENAI_FORMAT or (manifest is None and (folder / GENAI_CONFIG).is_file())


class EdgeLM:
    """An exported decoder LM with its KV cache, loaded with onnxruntime-genai.

    ``folder``: an `hf-distill export` folder (manifest, one subfolder per variant) or a single variant folder
    (``genai_config.json``, copied on its own). ``threads``: onnxruntime intra-op threads (default: all cores).
    """

    def __init__(self, folder: str | Path, variant: str | None = None, threads: int | None = None) -> None:
        self.folder = Path(folder)
        model_dir = self._variant_folder(variant)
        try:
            import onnxruntime_genai as og
        except ImportError as err:
            raise SystemExit(
                "error: decoder-LM exports run on onnxruntime-genai: pip install onnxruntime-genai"
            ) from err
        self.og = og
        try:
            config = og.Config(str(model_dir))
            if threads:
                options = {"intra_op_num_threads": int(threads)}
                config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
            self.model = og.Model(config)
            self.tokenizer = og.Tokenizer(self.model)
            genai_config = json.loads((model_dir / GENAI_CONFIG).read_text())
            self.context_length = int(genai_config["model"]["context_length"])
        except Exception as err:  # onnxruntime-genai raises its own error types for a damaged folder
            raise SystemExit(
                f"error: cannot load {model_dir} ({_one_line(err)}); the files are missing or corrupted. "
                "Copy the export folder again or re-run `hf-distill export`."
            ) from err

    def _variant_folder(self, variant: str | None) -> Path:
        """The onnxruntime-genai folder to load; a clear one-line error for anything else."""
        if not self.folder.is_dir():
            what = "is a file, not a folder" if self.folder.exists() else "does not exist"
            raise SystemExit(f"error: {self.folder} {what}; pass a folder written by `hf-distill export`.")
        manifest = _manifest(self.folder)
        if manifest is None:
            if (self.folder / GENAI_CONFIG).is_file():  # one variant folder copied on its own
                self.variant = variant or self.folder.name
                return self.folder
            raise SystemExit(
                f"error: {self.folder} holds neither {MANIFEST} nor {GENAI_CONFIG}; pass a folder written by "
                "`hf-distill export`."
            )
        if manifest.get("format") != GENAI_FORMAT:
            raise SystemExit(
                f"error: {self.folder} is a {manifest.get('task')} export without a KV cache; chat and streaming "
                "need a decoder-LM export made with onnxruntime-genai (hf-distill export of a causal LM)."
            )
        variants = manifest.get("variants") or {}
        self.variant = variant or manifest.get("default_variant")
        if self.variant not in variants:
            raise SystemExit(f"error: variant {self.variant!r} is not in this export; available: {sorted(variants)}.")
        return self.folder / variants[self.variant]

    def prompt_tokens(self, messages: list[dict[str, str]]) -> np.ndarray:
        """The chat template applied to ``messages``, with the assistant's generation prompt, as token ids."""
        text = self.tokenizer.apply_chat_template(messages=json.dumps(messages), add_generation_prompt=True)
        return np.asarray(self.tokenizer.encode(text), dtype=np.int32)

    def stream(
        self,
        messages: list[dict[str, str]],
        *,
        max_new_tokens: int = 128,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 50,
    ) -> Iterator[str]:
        """Yield the answer's text piece by piece as tokens are generated (greedy unless ``do_sample``); the answer
        stops at the model's context length (``max_length`` of onnxruntime-genai).

        Raises:
            SystemExit: the prompt alone fills the context (one line; :func:`fit_history` trims a chat).
        """
        ids = self.prompt_tokens(messages)
        room = self.context_length - len(ids)
        if room < 1:
            raise SystemExit(
                f"error: the prompt is {len(ids)} tokens; this model's context holds {self.context_length}. "
                "Shorten it (or the --system prompt)."
            )
        params = self.og.GeneratorParams(self.model)
        options = {"max_length": int(len(ids) + min(max_new_tokens, room)), "do_sample": do_sample}
        if do_sample:
            options.update(temperature=temperature, top_p=top_p, top_k=top_k)
        params.set_search_options(**options)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(ids[None, :])
        decoder = self.tokenizer.create_stream()
        while not generator.is_done():
            generator.generate_next_token()
            yield decoder.decode(int(generator.get_next_tokens()[0]))


def fit_history(model: EdgeLM, history: list[dict[str, str]], reserve: int) -> list[dict[str, str]]:
    """``history`` without its oldest user/assistant turns (a system message stays) until the prompt leaves
    ``reserve`` tokens of the context for the answer, or only the last user message is left."""
    system = history[:1] if history and history[0]["role"] == "system" else []
    turns = history[len(system) :]
    while len(turns) > 1 and len(model.prompt_tokens([*system, *turns])) + reserve > model.context_length:
        turns = turns[2:] if len(turns) > 2 else turns[1:]
    return [*system, *turns]


def _check(args: argparse.Namespace) -> None:
    """Every option's range, in one line, before the model loads."""
    problems = []
    if args.max_new_tokens < 1:
        problems.append("--max-new-tokens must be >= 1")
    if args.do_sample and args.temperature <= 0:
        problems.append("--temperature must be > 0 when sampling")
    if not 0 < args.top_p <= 1:
        problems.append("--top-p must be in (0, 1]")
    if args.top_k < 0:
        problems.append("--top-k must be >= 0 (0: no top-k filter)")
    if args.threads is not None and args.threads < 1:
        problems.append("--threads must be >= 1")
    if args.prompt is None and not args.chat:
        problems.append("give a prompt, or --chat for an interactive session")
    if args.prompt is not None and args.chat:
        problems.append("give a prompt or --chat, not both (--chat reads its messages from stdin)")
    if problems:
        raise SystemExit("error: " + "; ".join(problems) + ".")


def _answer(model: EdgeLM, messages: list[dict[str, str]], args: argparse.Namespace) -> str:
    pieces = []
    for piece in model.stream(
        messages,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
    ):
        pieces.append(piece)
        print(piece, end="", flush=True)
    print(flush=True)
    return "".join(pieces)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("prompt", nargs="?", default=None, help="One user message (omit with --chat).")
    parser.add_argument("--generate", default=None, help="Same as the prompt argument (hf-distill-edge's spelling).")
    parser.add_argument("--chat", action="store_true", help="Interactive chat: one user message per stdin line.")
    parser.add_argument("--system", default=None, help="System prompt.")
    parser.add_argument("--variant", default=None, help="Variant to run (default: the manifest's default_variant).")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--do-sample", action="store_true", help="Sample (default: greedy).")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads.")
    args = parser.parse_intermixed_args(argv)
    args.prompt = args.prompt if args.generate is None else args.generate
    _check(args)
    model = EdgeLM(args.model_dir, args.variant, args.threads)
    history = [{"role": "system", "content": args.system}] if args.system else []
    if not args.chat:
        _answer(model, [*history, {"role": "user", "content": args.prompt}], args)
        return
    for line in sys.stdin:
        if line.strip() in ("", "/exit"):
            break
        history.append({"role": "user", "content": line.strip()})
        # A long session forgets its oldest turns rather than outgrowing the model's context.
        history = fit_history(model, history, reserve=min(args.max_new_tokens, model.context_length // 2))
        history.append({"role": "assistant", "content": _answer(model, history, args)})


if __name__ == "__main__":
    main()
