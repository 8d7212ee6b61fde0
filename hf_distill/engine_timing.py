"""What runs inside a benchmark's spawned engine process: load one engine, time it, report the process's peak RSS.

Kept outside :mod:`hf_distill.export` and free of torch and transformers at import time: the spawned process
imports this module to unpickle its job, and importing the export package would load torch and transformers
(about 460 MB of resident memory) into every onnxruntime row's peak. Only the PyTorch rows import torch, because
they use it.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: ``VmHWM`` of ``/proc/self/status``, its own memory map's mark.

    Not getrusage's ``ru_maxrss`` on Linux: a spawned engine process starts as a fork of the benchmark and Linux
    carries the high-water mark across exec, so every engine would report at least the parent's peak (a 30 MB child
    of a 410 MB parent reports 410 MB).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # elsewhere: macOS reports bytes, others KiB
    return peak / (1024.0 * 1024.0 if platform.system() == "Darwin" else 1024.0)


def _latencies(run: Any, warmup: int, runs: int) -> np.ndarray:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return np.array(times) * 1000.0


def _feed(batch: int, seq: int, vocab: int, names: Sequence[str]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(min(1000, vocab - 1), vocab, size=(batch, seq), dtype=np.int64)
    full = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return {n: full[n] for n in names}


def measure_classifier_engine(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs in a fresh process: load one engine, time it over the grid, report its peak RSS."""
    rows = []
    if spec["engine"] == "pytorch":
        import torch

        from hf_distill.export.inputs import input_names_for
        from hf_distill.export.plan import load_for_inference

        if spec["threads"]:
            torch.set_num_threads(spec["threads"])
        model = load_for_inference(spec["path"])
        names = input_names_for(model)

        def runner(feed: dict[str, np.ndarray]) -> Any:
            tensors = {k: torch.from_numpy(v) for k, v in feed.items()}
            return lambda: model(**tensors)

        context: Any = torch.inference_mode()
        vocab = model.config.vocab_size
    else:
        import contextlib

        import onnxruntime as ort

        options = ort.SessionOptions()
        if spec["threads"]:
            options.intra_op_num_threads = spec["threads"]
        try:
            session = ort.InferenceSession(spec["path"], options, providers=[spec["provider"]])
        except Exception as err:  # onnxruntime's own exception types do not cross the process boundary cleanly
            raise ValueError(f"Cannot load {spec['path']} in onnxruntime ({type(err).__name__}): {err}") from None
        shapes = {i.name: i.shape for i in session.get_inputs()}
        names = [n for n in shapes if n != "prompt_embeds"]
        # A prompt-as-input export: latency does not depend on the prompt's values.
        prompt = np.zeros(shapes["prompt_embeds"], dtype=np.float32) if "prompt_embeds" in shapes else None

        def runner(feed: dict[str, np.ndarray]) -> Any:
            feed = {**feed, "prompt_embeds": prompt} if prompt is not None else feed
            return lambda: session.run(None, feed)

        context, vocab = contextlib.nullcontext(), spec["vocab"]
    with context:
        for batch in spec["batch_sizes"]:
            for seq in spec["seq_lens"]:
                times = _latencies(runner(_feed(batch, seq, vocab, names)), spec["warmup"], spec["runs"])
                rows.append(
                    {
                        "batch": batch,
                        "seq_len": seq,
                        "p50_ms": float(np.percentile(times, 50)),
                        "p90_ms": float(np.percentile(times, 90)),
                        "p99_ms": float(np.percentile(times, 99)),
                        "throughput_per_s": float(batch * 1000.0 / times.mean()),
                    }
                )
    peak_mb = peak_rss_mb()
    return [{**row, "peak_rss_mb": peak_mb} for row in rows]


def _prompt(batch: int, length: int, vocab: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(min(100, vocab - 1), vocab, size=(batch, length), dtype=np.int64)


class _Genai:
    def __init__(self, folder: str) -> None:
        import onnxruntime_genai as og

        self.og, self.model = og, og.Model(folder)

    def run(self, ids: np.ndarray, new_tokens: int) -> tuple[float, float]:
        """(seconds to the first token, seconds for the remaining ``new_tokens - 1``)."""
        params = self.og.GeneratorParams(self.model)
        total = ids.shape[1] + new_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=ids.shape[0])
        start = time.perf_counter()
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(ids.astype(np.int32))
        generator.generate_next_token()
        first = time.perf_counter()
        while not generator.is_done():
            generator.generate_next_token()
        return first - start, time.perf_counter() - first


class _Torch:
    def __init__(self, folder: str) -> None:
        import torch

        from hf_distill.loading import load_model
        from hf_distill.tasks import Task

        self.torch = torch
        self.model = load_model(folder, Task.CAUSAL_LM, with_tokenizer=False)[0].float().eval()

    def run(self, ids: np.ndarray, new_tokens: int) -> tuple[float, float]:
        tensor = self.torch.from_numpy(ids)
        mask = self.torch.ones_like(tensor)
        kwargs = {"do_sample": False, "top_k": None, "top_p": None, "pad_token_id": 0, "attention_mask": mask}
        with self.torch.inference_mode():
            start = time.perf_counter()
            self.model.generate(tensor, max_new_tokens=1, min_new_tokens=1, **kwargs)
            first = time.perf_counter() - start
            start = time.perf_counter()
            self.model.generate(tensor, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
            whole = time.perf_counter() - start
        return first, max(whole - first, 1e-9)


def measure_llm_engine(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: load one engine, time TTFT and decode, report its peak RSS."""
    if spec["threads"]:
        os.environ["OMP_NUM_THREADS"] = str(spec["threads"])
    engine = _Genai(spec["path"]) if spec["engine"] == "onnxruntime-genai" else _Torch(spec["path"])
    vocab, runs = spec["vocab"], spec["runs"]
    engine.run(_prompt(1, 16, vocab), 4)  # warm-up
    ttft = {
        str(n): float(np.median([engine.run(_prompt(1, n, vocab), 1)[0] for _ in range(runs)])) * 1000
        for n in spec["prompt_lens"]
    }
    decode = {}
    for batch in spec["batch_sizes"]:
        seconds = np.median([engine.run(_prompt(batch, 16, vocab), spec["new_tokens"])[1] for _ in range(runs)])
        decode[str(batch)] = float(batch * (spec["new_tokens"] - 1) / seconds)
    return {"ttft_ms": ttft, "decode_tokens_per_s": decode, "peak_rss_mb": peak_rss_mb()}
