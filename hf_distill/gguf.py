"""GGUF teachers: a ``.gguf`` file (llama.cpp's format, how many users hold their big models) as a distillation teacher.

transformers reads GGUF itself (``from_pretrained(folder, gguf_file=name)``, with the ``gguf`` package installed),
dequantising every tensor to fp32; we use that reader rather than our own. A model loaded that way refuses
``save_pretrained``, so :func:`convert_gguf` copies its state dict into a fresh model of the same config and saves
that as a safetensors folder, once: later runs find the folder (keyed by the file's size and modification time) and
load it directly, which is both faster (no dequantisation) and what the rest of hf_distill expects.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path

from hf_distill.atomic import atomic_folder

logger = logging.getLogger(__name__)
GGUF_MAGIC = b"GGUF"
SOURCE_RECORD = "hf_distill_gguf_source.json"


def is_gguf(source: str | os.PathLike) -> bool:
    """True for a path that names a ``.gguf`` file (existing or not)."""
    return str(source).lower().endswith(".gguf")


def check_gguf_file(path: str | os.PathLike) -> None:
    """ValueError unless ``path`` is an existing file that starts with the GGUF magic bytes (cheap: 4 bytes read)."""
    _check_file(Path(path).expanduser())


def gguf_block_count(path: str | os.PathLike) -> int | None:
    """The number of transformer blocks a GGUF file declares (``<architecture>.block_count``), without loading
    its tensors; None when the metadata lacks it, the file cannot be parsed or the ``gguf`` package is missing."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    try:
        fields = GGUFReader(str(path)).fields
        counts = [int(f.parts[f.data[0]][0]) for name, f in fields.items() if name.endswith(".block_count")]
    except Exception:  # noqa: BLE001 - a damaged file: convert_gguf reports it with its own one-line error
        return None
    return counts[0] if counts else None


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"GGUF file {str(path)!r} does not exist.")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(
            f"{str(path)!r} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}): the file is truncated, "
            "corrupted or of another format. Re-download it, or pass a transformers folder instead."
        )


def _source_record(path: Path) -> dict[str, object]:
    stat = path.stat()
    return {"file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def converted_folder(path: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """Where :func:`convert_gguf` puts the safetensors copy of ``path`` under ``cache_dir``."""
    return Path(cache_dir) / Path(path).name.removesuffix(".gguf").removesuffix(".GGUF")


def convert_gguf(path: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """The safetensors folder (model + tokenizer) of the causal LM in GGUF file ``path``; converted once.

    The folder is ``cache_dir/<file stem>``; it is reused while the GGUF file keeps its size and modification time,
    and written atomically (a temporary sibling, then a rename), so an interrupted conversion leaves nothing behind.

    Raises:
        ValueError: the file is missing, is not GGUF, or transformers cannot read it (unsupported architecture,
            missing ``gguf`` package).
    """
    path = Path(path).expanduser()
    _check_file(path)
    target = converted_folder(path, cache_dir)
    record = _source_record(path)
    saved = target / SOURCE_RECORD
    if saved.is_file() and json.loads(saved.read_text()) == record:
        logger.info("GGUF teacher %s: using its converted copy %s", path, target)
        return target
    started = time.time()
    model, tokenizer = _read_gguf(path)
    with atomic_folder(target) as staging:
        # A GGUF-loaded model refuses save_pretrained; a fresh model of its config takes its weights and saves.
        # The weights are dequantised fp32 now: the config must not claim a GGUF quantization any more.
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = type(model)(config)
        fresh.load_state_dict(model.state_dict())
        fresh.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / SOURCE_RECORD).write_text(json.dumps(record))
    logger.info("Converted GGUF teacher %s to safetensors in %s (%.0f s, fp32)", path, target, time.time() - started)
    return target


def _read_gguf(path: Path) -> tuple[object, object]:
    try:
        import gguf  # noqa: F401  (transformers needs it; a clear message beats its ImportError)
    except ImportError as err:
        raise ValueError("A GGUF teacher needs the gguf package: pip install gguf (or hf-distill[llm]).") from err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    except Exception as err:  # a damaged file fails deep in the reader (struct.error, KeyError, ...): say which file
        raise ValueError(
            f"transformers could not read the GGUF file {str(path)!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:300]}). Supported are the architectures transformers' GGUF loader knows "
            "(llama, mistral, qwen2, qwen3, phi3, gemma, ...)."
        ) from err
    return model, tokenizer
