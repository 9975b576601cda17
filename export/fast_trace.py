"""``torch.onnx.export(dynamo=True, optimize=False)`` with ONE torch trace instead of two (torch 2.13.0 only).

The public exporter traces the model twice: ``torch.export.export`` captures the training IR (make_fx), then
``_prepare_exported_program_for_export`` -> ``decompose_with_registry`` -> ``ExportedProgram.run_decompositions``
retraces the whole program through aot_export with the ONNX-friendly decomposition table. ``export`` below does
that second, decomposing trace directly on the module (``torch.export._trace._export(pre_dispatch=False)``, whose
aot_export gets the same table and the same CompositeImplicitAutograd overrides run_decompositions installs), then
every later step of the public path unchanged: type-promotion insertion, assertion removal (both under
``backed_size_oblivious``), translation with the same registry, opset conversion, input/output names, dim names.
The graphs are the public path's node for node (tests/test_fast_trace.py; docs/export.md "One torch trace").

Type promotion reuses each node's ``meta["val"]`` (the fake value the trace recorded) instead of re-running the
node under fake tensors; nodes the pass rewrites or inserts are still run.

Private functions used (pinned torch 2.13.0; on any other version ``SUPPORTED`` is False and ``onnx_trace`` takes
the public ``torch.onnx.export``):
- torch.export._trace: ``_export`` (pre_dispatch=False), ``_export_to_aten_ir`` (its ``decomp_table``);
- torch.export.exported_program: ``_split_decomp_table_to_cia_and_python_decomp``,
  ``_override_composite_implicit_decomp``;
- torch.onnx._internal.exporter: ``_registration.ONNXRegistry.from_torchlib``, ``_decomp``,
  ``_dynamic_shapes.convert_str_to_export_dim``, ``_capture_strategies._patch_dynamic_shape_rnn_decompositions``,
  ``_flags.set_onnx_exporting_flag``, ``_fx_passes.remove_assertion_nodes``,
  ``_core._exported_program_to_onnx_program``, ``_ir_passes.rename_inputs`` / ``rename_outputs``,
  ``ONNXProgram._rename_dynamic_axes``, ``_constants.TORCHLIB_OPSET``;
- torch.onnx._internal.fx.passes.type_promotion: ``InsertTypePromotion``, ``_TypePromotionInterpreter``,
  ``get_type_promotion_rule``, ``TypePromotionTable``;
- torch.onnx._internal._lazy_import: ``onnxscript_apis.convert_version``.
"""

from __future__ import annotations

import contextlib
import functools
import unittest.mock

import onnx_ir as ir
import torch
from torch import nn

TORCH_VERSION = "2.13.0"
SUPPORTED = torch.__version__.split("+")[0] == TORCH_VERSION


def export(model: nn.Module, args: tuple, dynamic_shapes, input_names: list[str], output_names: list[str],
           opset: int, table: dict) -> ir.Model:
    """The ir.Model ``torch.onnx.export(model, args, dynamo=True, optimize=False, opset_version=opset,
    custom_translation_table=table, dynamic_shapes=..., input_names=..., output_names=...)`` returns."""
    if not SUPPORTED:
        raise RuntimeError(f"fast_trace: written against torch {TORCH_VERSION}, found {torch.__version__}")
    return _export(model, args, dynamic_shapes, input_names, output_names, opset, tuple(table.items()))


def _export(model, args, dynamic_shapes, input_names, output_names, opset, table):
    from torch.onnx import _flags as public_flags
    from torch.onnx._internal._lazy_import import onnxscript_apis
    from torch.onnx._internal.exporter import (
        _capture_strategies,
        _core,
        _dynamic_shapes,
        _flags,
        _fx_passes,
        _ir_passes,
    )

    @_flags.set_onnx_exporting_flag
    def run():
        registry, cia, decomps = _tables(opset, table)
        dims, rename_dims = _dynamic_shapes.convert_str_to_export_dim(dynamic_shapes)
        with _decomposing(decomps), contextlib.ExitStack() as stack:
            stack.enter_context(_capture_strategies._patch_dynamic_shape_rnn_decompositions(dims))
            stack.enter_context(torch.fx.experimental._config.patch(backed_size_oblivious=True))
            stack.enter_context(_override_cia(cia))
            # stack traces: recorded per node by this path (the public one copies them from the first trace); the
            # exporter's pkg.torch.onnx.stack_trace metadata is dropped by onnx_trace anyway
            stack.enter_context(unittest.mock.patch.object(torch.fx.config, "do_not_emit_stack_traces", True))
            from torch.export._trace import _export as capture

            ep = capture(model, args, None, dims, strict=False, pre_dispatch=False,
                         prefer_deferred_runtime_asserts_over_guards=public_flags.PREFER_DEFERRED_RUNTIME_ASSERTS_OVER_GUARDS)
        with torch.fx.experimental._config.patch(backed_size_oblivious=True):  # as _prepare_exported_program_for_export
            _insert_type_promotion(ep.graph_module)
            ep._graph_module = _fx_passes.remove_assertion_nodes(ep.graph_module)
        prog = _core._exported_program_to_onnx_program(ep, registry=registry)
        prog.model = onnxscript_apis.convert_version(prog.model, opset)
        _ir_passes.rename_inputs(prog.model, input_names)
        _ir_passes.rename_outputs(prog.model, output_names)
        if rename_dims and dynamic_shapes is not None:
            prog._rename_dynamic_axes(dynamic_shapes)
        return prog.model

    return run()


def _tables(opset: int, table: tuple) -> tuple:
    """(ONNX registry with the custom table, CIA overrides, python decompositions): what torch.onnx's export_compat
    and decompose_with_registry build (per call, as they do: ~0.7 s; the dsv4 table's functions are new objects
    on every custom_ops.translation_table() call, so there is no stable key to keep them by)."""
    from torch.export.exported_program import _split_decomp_table_to_cia_and_python_decomp
    from torch.onnx._internal.exporter import _constants, _decomp, _registration

    registry = _registration.ONNXRegistry().from_torchlib(opset_version=max(opset, _constants.TORCHLIB_OPSET))
    for torch_op, onnx_op in table:
        registry.register_op(torch_op, onnx_op, is_complex=False)
    onnx_ops = set(_decomp.get_onnx_implemented_overloads(registry))
    cia, decomps = _split_decomp_table_to_cia_and_python_decomp(_decomp.create_onnx_friendly_decomposition_table(onnx_ops))
    return registry, cia, decomps


@contextlib.contextmanager
def _decomposing(decomps: dict):
    """torch.export's aot capture with `decomps` (run_decompositions hands its table to the same function); the
    patch is process-wide while it lasts (one export at a time, as torch.onnx.export)."""
    import torch.export._trace as trace

    plain = trace._export_to_aten_ir
    trace._export_to_aten_ir = functools.partial(plain, decomp_table=decomps)
    try:
        yield
    finally:
        trace._export_to_aten_ir = plain


def _override_cia(cia: dict):
    from torch.export.exported_program import _override_composite_implicit_decomp

    return _override_composite_implicit_decomp(cia)


def _insert_type_promotion(gm: torch.fx.GraphModule) -> None:
    """torch.onnx's insert_type_promotion_nodes, the traced fake values reused for the nodes it leaves alone."""
    from torch.onnx._internal.fx.passes import type_promotion as tp

    class Interpreter(tp._TypePromotionInterpreter):
        def run_node(self, n: torch.fx.Node):
            if n.op != "call_function" or "val" not in n.meta:
                return super().run_node(n)
            with self._set_current_node(n):
                if rule := tp.get_type_promotion_rule(n, self.type_promotion_table):
                    self._maybe_promote_node(n, rule)  # a rewritten node is re-run and its meta["val"] updated
            return n.meta["val"]

    for module in gm.modules():
        if not isinstance(module, torch.fx.GraphModule):
            raise TypeError(f"fast_trace: a submodule {type(module).__name__} is not a GraphModule")
        promote = tp.InsertTypePromotion(module)
        promote.interpreter = Interpreter(module, tp.TypePromotionTable())
        promote.run()
