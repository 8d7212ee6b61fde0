"""Edge export: a saved student -> validated ONNX variants (``export_onnx``) -> latency/size numbers (``benchmark``).

One pass per file, path in -> path out: ``inputs`` (what a graph takes), ``batches`` (the gate's data), ``plan``
(what is exported: adapter merge, soft prompt, limits), ``graph`` (torch.onnx), ``variants`` (onnxruntime's fusions
and quantizers), ``validate`` (the accuracy gate and ``variant_table``), ``onnx`` (the atomic export folder),
``bench`` (PyTorch eager against every variant).
"""

from hf_distill.export.bench import benchmark
from hf_distill.export.onnx import MANIFEST, REPORT, export_onnx
from hf_distill.export.validate import GateError, variant_table

__all__ = ["MANIFEST", "REPORT", "GateError", "benchmark", "export_onnx", "variant_table"]
