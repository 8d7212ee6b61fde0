"""ONNX variants of an exported model, each its own file, built with onnxruntime's own tools (no hand-written
quantizers): graph fusions, int8 dynamic, int8 static QDQ, fp16, int4 weight-only (MatMulNBits)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

logger = logging.getLogger(__name__)

VARIANT_FILES = {
    "fp32": "model.onnx",
    "fp32_optimized": "model_optimized.onnx",
    "int8_dynamic": "model_int8.onnx",
    "int8_static": "model_int8_static.onnx",
    "fp16": "model_fp16.onnx",
    "int4": "model_int4.onnx",
}
# onnxruntime.transformers.optimizer knows these families; others get onnxruntime's generic extended optimisations.
FUSION_TYPES = {
    "bert": "bert",
    "roberta": "bert",
    "distilbert": "bert",
    "xlm-roberta": "bert",
    "electra": "bert",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "phi": "phi",
    "qwen3": "qwen3",
}
# The int8 fallback ladder, tried in order until one passes the accuracy gate.
INT8_LADDER: tuple[dict[str, Any], ...] = (
    {"rung": "default"},
    {"rung": "per_channel", "per_channel": True},
    {"rung": "per_channel_reduce_range", "per_channel": True, "reduce_range": True},
    {"rung": "static_qdq"},
    {"rung": "exclude_sensitive", "per_channel": True},
)


@dataclass
class BuiltVariant:
    variant: str
    file: str
    settings: dict[str, Any] = field(default_factory=dict)


class _DropPreprocessHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "consider to run pre-processing" not in message and "consider pre-processing" not in message


def _quiet_onnxruntime() -> None:
    # quantize_* log a generic "consider pre-processing" hint through the root logger on every call; drop only it.
    root = logging.getLogger()
    if not any(isinstance(f, _DropPreprocessHint) for f in root.filters):
        root.addFilter(_DropPreprocessHint())


def build_variant(
    variant: str,
    base: str,
    folder: Path,
    model: Any,
    calibration: Any,
    num_calibration: int,
    rung: dict[str, Any] | None = None,
) -> BuiltVariant:
    """Write ``variant`` of the fp32 graph ``base`` into ``folder``."""
    target = str(folder / VARIANT_FILES[variant])
    if variant == "fp32":
        return BuiltVariant(variant, VARIANT_FILES[variant])
    if variant == "fp32_optimized":
        return BuiltVariant(variant, VARIANT_FILES[variant], optimize(base, target, model.config))
    if variant == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        # keep_io_types: callers still feed int64 ids and read float32 logits.
        onnx.save(convert_float_to_float16(onnx.load(base), keep_io_types=True), target)
        return BuiltVariant(variant, VARIANT_FILES[variant], {"keep_io_types": True})
    if variant == "int4":
        return BuiltVariant(variant, VARIANT_FILES[variant], quantize_int4(base, target))
    if variant == "int8_static":
        return BuiltVariant(
            variant, VARIANT_FILES[variant], quantize_static_qdq(base, target, calibration, num_calibration)
        )
    rung = rung or INT8_LADDER[0]
    if rung["rung"] == "static_qdq":
        settings = quantize_static_qdq(base, target, calibration, num_calibration)
    else:
        settings = _int8_dynamic_rung(base, target, folder, model.config, calibration, rung)
    return BuiltVariant(variant, VARIANT_FILES[variant], {"rung": rung["rung"], **settings})


def _int8_dynamic_rung(
    base: str, target: str, folder: Path, config: Any, calibration: Any, rung: dict[str, Any]
) -> dict[str, Any]:
    """Dynamic int8 of the fused graph where onnxruntime's transformer fusions apply, else of ``base``.

    Fusing first is onnxruntime's documented order for transformers: a fused ``Attention`` becomes one
    ``QAttention`` and the quantizer sees whole GEMMs. Measured on a 3-layer MiniLM student, batch 1 x 64, Intel
    Xeon (VNNI): 1.35 ms against 1.47 ms for the same graph quantized unfused (`benchmarks/int8_fusion.py`).
    """
    fused_path = str(folder / ".int8_fused_source.onnx")
    fused, _ = transformer_fusions(base, fused_path, config)
    source = fused_path if fused else base
    try:
        exclude = sensitive_nodes(source, calibration) if rung["rung"] == "exclude_sensitive" else []
        settings = quantize_int8_dynamic(
            source,
            target,
            per_channel=rung.get("per_channel", False),
            reduce_range=rung.get("reduce_range", False),
            nodes_to_exclude=exclude,
        )
    finally:
        if os.path.exists(fused_path):
            os.remove(fused_path)
    return {**settings, "fused_operators": fused or {}}


def optimize(base: str, target: str, config: Any) -> dict[str, Any]:
    """onnxruntime's transformer fusions (attention, LayerNorm, GELU) where the family is supported, else
    onnxruntime's generic extended graph optimizations."""
    fused, fusion_error = transformer_fusions(base, target, config)
    if fused is not None:
        return {"optimizer": f"onnxruntime.transformers ({FUSION_TYPES[config.model_type]})", "fused_operators": fused}
    if fusion_error is not None:
        logger.warning("fp32_optimized uses onnxruntime's generic graph optimizations instead.")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = target
    ort.InferenceSession(base, options, providers=["CPUExecutionProvider"])
    settings: dict[str, Any] = {"optimizer": "onnxruntime ORT_ENABLE_EXTENDED"}
    return settings if fusion_error is None else {**settings, "fusion_error": fusion_error}


def transformer_fusions(base: str, target: str, config: Any) -> tuple[dict[str, int] | None, str | None]:
    """Write ``onnxruntime.transformers.optimizer``'s fusions of ``base`` to ``target``.

    Returns ``(fused operator counts, None)``, or ``(None, None)`` (nothing written) where the family has no fusions
    or the graph keeps its weights in a side file, or ``(None, error)`` where the fusions raised.
    """
    model_type = FUSION_TYPES.get(getattr(config, "model_type", ""))
    if model_type is None or os.path.exists(base + ".data"):
        return None, None
    from onnxruntime.transformers.optimizer import optimize_model

    try:
        optimized = optimize_model(
            base,
            model_type=model_type,
            num_heads=getattr(config, "num_attention_heads", 0),
            hidden_size=getattr(config, "hidden_size", 0),
        )
        optimized.save_model_to_file(target)
    except Exception as err:  # onnxruntime's pattern matchers assume graph shapes our exporters may not give
        error = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        logger.warning("onnxruntime's %s fusions failed on this graph (%s); it stays unfused.", model_type, error)
        return None, error
    return {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}, None


def quantize_int8_dynamic(
    base: str,
    target: str,
    *,
    per_channel: bool = False,
    reduce_range: bool = False,
    nodes_to_exclude: list[str] | None = None,
) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _quiet_onnxruntime()
    quantize_dynamic(
        base,
        target,
        weight_type=QuantType.QInt8,
        per_channel=per_channel,
        reduce_range=reduce_range,
        nodes_to_exclude=nodes_to_exclude or [],
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return {"per_channel": per_channel, "reduce_range": reduce_range, "excluded_nodes": nodes_to_exclude or []}


class _Reader:
    """onnxruntime CalibrationDataReader over the user's calibration batches."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _calibration_feeds(calibration: Any, limit: int) -> list[dict[str, np.ndarray]]:
    feeds, seen = [], 0
    for batch in calibration.inputs:
        feeds.append(batch)
        seen += len(next(iter(batch.values())))
        if seen >= limit:
            break
    return feeds


def quantize_static_qdq(base: str, target: str, calibration: Any, num_calibration: int) -> dict[str, Any]:
    """Static int8 in QDQ format, activations calibrated (MinMax) on ``num_calibration`` real examples."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    _quiet_onnxruntime()
    feeds = _calibration_feeds(calibration, num_calibration)
    # Matrix products carry the cost; quantizing softmax/LayerNorm inputs costs accuracy for little speed.
    quantize_static(
        base,
        target,
        _Reader(feeds),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul", "Gemm"],
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        extra_options={"ActivationSymmetric": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    examples = sum(len(next(iter(f.values()))) for f in feeds)
    return {"format": "QDQ", "calibration_examples": examples, "calibration_method": "MinMax", "per_channel": True}


def quantize_int4(base: str, target: str, block_size: int = 32) -> dict[str, Any]:
    """Weight-only int4 (MatMulNBits) for decoder LMs; activations stay in float."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(base), bits=4, block_size=block_size, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(target, use_external_data_format=False)
    return {"bits": 4, "block_size": block_size, "symmetric": True}


def sensitive_nodes(base: str, calibration: Any, fraction: float = 0.25) -> list[str]:
    """MatMul nodes whose int8 quantization alone moves the logits most, measured on one real batch.

    Each candidate is quantized on its own and the output change recorded; the top ``fraction`` stay in fp32.
    """
    import onnxruntime as ort

    graph = onnx.load(base, load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    candidates = [
        n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and any(i in initializers for i in n.input)
    ]
    if not candidates:
        return []
    feed = calibration.inputs[0]
    reference = ort.InferenceSession(base, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    scores = {}
    probe = base + ".probe.onnx"
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _quiet_onnxruntime()
    try:
        for name in candidates:
            quantize_dynamic(
                base,
                probe,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=[name],
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
            output = ort.InferenceSession(probe, providers=["CPUExecutionProvider"]).run(None, feed)[0]
            scores[name] = float(np.abs(output - reference).max())
    finally:
        if os.path.exists(probe):
            os.remove(probe)
    ranked = sorted(scores, key=scores.get, reverse=True)
    return ranked[: max(1, int(len(ranked) * fraction))]
