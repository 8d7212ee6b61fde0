"""Edge export: a saved student -> validated ONNX variants (``export_onnx``) -> latency/size numbers (``benchmark``).

One pass per file, path in -> path out: ``inputs`` (what a graph takes), ``batches`` (the gate's data), ``plan``
(what is exported: adapter merge, soft prompt, limits), ``graph`` (torch.onnx), ``variants`` (onnxruntime's fusions
and quantizers), ``validate`` (the accuracy gate and ``variant_table``), ``onnx`` (the atomic export folder),
``bench`` (PyTorch eager against every variant). Decoder LMs with a KV cache: ``engine`` (which exporter a model
goes through: the one rule), ``genai`` (onnxruntime-genai's builder, the LLM gate), ``llm`` (``export_llm``),
``bench_llm`` (``benchmark_llm``: time to first token, decode tokens/s).
"""

from hf_distill.export.bench import benchmark
from hf_distill.export.bench_llm import benchmark_llm
from hf_distill.export.engine import EngineChoice, choose_engine
from hf_distill.export.llm import export_llm
from hf_distill.export.onnx import MANIFEST, REPORT, export_onnx
from hf_distill.export.validate import GateError, variant_table

__all__ = [
    "MANIFEST",
    "REPORT",
    "EngineChoice",
    "GateError",
    "benchmark",
    "benchmark_llm",
    "choose_engine",
    "export_llm",
    "export_onnx",
    "variant_table",
]
