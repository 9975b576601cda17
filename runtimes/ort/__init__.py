"""dsv4.runtimes.ort: artifacts run by ONNX Runtime (the only package importing onnxruntime)."""

from .generator import Generator
from .session import load_sessions, providers_for, session_options

__all__ = ["Generator", "load_sessions", "providers_for", "session_options"]
