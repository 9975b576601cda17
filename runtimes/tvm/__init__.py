"""dsv4.runtimes.tvm: artifacts compiled by Apache TVM (Relax) for llvm and CUDA; the only package importing tvm.

frontend.py (ONNX -> Relax, dsv4 lowerings or inlined bodies) · lowerings.py (TE kernels of the dsv4 ops) ·
importer_fixes.py (converters repairing TVM's ONNX importer) · backend.py (pipeline, build, weights, VM) ·
library.py (``dsv4 compile`` directories) · generator.py (the Generator). Decision notes: docs/tvm.md.
"""

from .generator import Generator
from .library import compile_artifact, load_compiled

__all__ = ["Generator", "compile_artifact", "load_compiled"]
