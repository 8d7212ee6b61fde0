"""Edge export: a saved student -> validated ONNX variants (``export_onnx``) -> latency/size numbers (``benchmark``).

One pass per file, path in -> path out: ``inputs`` (what a graph takes), ``graph`` (torch.onnx), ``variants``
(onnxruntime's fusions and quantizers), ``validate`` (the accuracy gate), ``onnx`` (the atomic export folder),
``bench`` (PyTorch eager against every variant).
"""

from hf_distill.export.bench import benchmark
from hf_distill.export.onnx import MANIFEST, REPORT, export_onnx
from hf_distill.export.validate import GateError

__all__ = ["MANIFEST", "REPORT", "GateError", "benchmark", "export_onnx"]
