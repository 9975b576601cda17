"""Converters that repair TVM 0.27's ONNX importer on the graphs torch's exporter writes (dynamic batch/length).

Each class below replaces one stock converter for the duration of an import (installed by frontend.py, the
only module that touches the converter table) and delegates to the stock one whenever its case is not the
broken one. Every entry names the failure it fixes, as observed on dsv4's exported graphs (docs/tvm.md).

The importer represents a symbolic size (``Squeeze(Shape(x))``) as a bare PrimExpr, and ONLY some converters
accept one; torch's exporter feeds such sizes into Where, Reshape, Concat, Expand and friends. So:

* ``tensorizing``: every converter outside PRIM_AWARE gets PrimExpr inputs as 0-d int64 tensors
  ("requires argument 2 (x2) to be a tensor. However, the argument T.int64(4) + length is ... T.int64");
* ``binary``: Add/Mul/... of a PrimExpr with a non-scalar tensor ("can only convert an array of size 1 to a
  Python scalar") get the PrimExpr as a tensor; scalar-with-scalar stays symbolic arithmetic;
* Reshape(size, [-1]) becomes the 1-element shape ``[size]`` so the size stays symbolic downstream
  ("Reshape expects the input data to be a Tensor. However, the given input is ir.PrimType");
* Concat of shapes and tensors concatenates tensors ("expects the input to be a Tuple of Tensors");
* Range over symbolic bounds builds ``arange(start, limit, step)`` with a symbolic length instead of a fresh
  unknown ``range_len`` (which made every later broadcast against ``length`` lose its shape);
* Expand to a constant shape with -1/1 entries on a tensor of symbolic shape (``'Var' object has no attribute
  'value'``) broadcasts with the symbolic dims kept;
* Cast to FLOAT8E4M3FN: TVM's fp8 conversion rounds fp8 subnormals (|v| < 2^-6) wrongly (0.001 -> 2^-7 instead
  of 2^-9; a third of random values below 2^-6 differ from ml_dtypes/torch); the FP8 simulations of the model
  (act quant, KV rounding) then drift from the reference. It becomes an exact round-to-nearest-even onto the
  e4m3fn grid (lowerings.fp8_round) whose values stay in fp32: the graph always casts them straight back;
* Equal of two bool tensors legalises to an fcmp on i1 that LLVM's verifier rejects ("Invalid operand types
  for FCmp instruction"): computed as not(xor).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as ofe

# Stock converters that handle PrimExpr inputs themselves (read from onnx_frontend.py, TVM 0.27).
PRIM_AWARE = frozenset({"Cast", "Gather", "Neg", "Range", "Slice", "Split", "Squeeze", "Unsqueeze", "Trilu",
                        "OneHot", "Reshape", "Concat", "Shape", "Constant", "Identity"})


def is_prim(x) -> bool:
    return x is not None and tvm.ir.is_prim_expr(x)


def tensorize(bb: relax.BlockBuilder, x):
    """A PrimExpr as a 0-d int64 tensor; anything else unchanged."""
    if not is_prim(x):
        return x
    t = bb.normalize(relax.op.shape_to_tensor(relax.ShapeExpr([x])))
    return bb.normalize(relax.op.reshape(t, ()))


def _inputs(items) -> ofe.onnx_input:
    out = ofe.onnx_input()
    for x in items:
        out.append(x)
    return out


def _scalarish(x) -> bool:
    return x is None or is_prim(x) or (isinstance(x, tvm.ir.GenericConst) and x.value.numpy().size == 1)


def tensorizing(conv: type, binary: bool) -> type:
    """`conv` with PrimExpr inputs turned into tensors (for binary ops: only when mixed with real tensors)."""

    class Wrapped(conv):
        @classmethod
        def get_converter(cls, opset):
            impl = conv.get_converter(opset)

            def run(bb, inputs, attr, params):
                if not (binary and all(_scalarish(x) for x in inputs)):
                    inputs = _inputs(tensorize(bb, x) for x in inputs)
                return impl(bb, inputs, attr, params)

            return run

    Wrapped.__name__ = Wrapped.__qualname__ = f"Fixed{conv.__name__}"
    return Wrapped


class Reshape(ofe.Reshape):
    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        data, shape = inputs[0], inputs[1]
        if is_prim(data) and isinstance(shape, tvm.ir.GenericConst) and shape.value.numpy().tolist() in ([1], [-1]):
            return relax.ShapeExpr([data])
        return super()._impl_v13(bb, _inputs([tensorize(bb, data), shape]), attr, params)


class Concat(ofe.Concat):
    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        def shape_like(x):
            return isinstance(x, relax.ShapeExpr) or (
                isinstance(x, tvm.ir.GenericConst) and x.ty.ndim == 1 and x.ty.dtype == "int64")

        if not all(shape_like(x) for x in inputs):
            inputs = _inputs(bb.normalize(relax.op.shape_to_tensor(x)) if isinstance(x, relax.ShapeExpr)
                             else tensorize(bb, x) for x in inputs)
        return super()._impl_v13(bb, inputs, attr, params)


class Range(ofe.Range):
    @classmethod
    def _impl_v12(cls, bb, inputs, attr, params):
        def scalar(x):
            if isinstance(x, tvm.ir.GenericConst) and x.value.numpy().size == 1 and x.ty.dtype == "int64":
                return tvm.tirx.const(int(x.value.numpy().item()), "int64")
            if is_prim(x) and str(getattr(x, "dtype", None) or x.ty) == "int64":
                return x
            return None

        start, limit, step = (scalar(x) for x in inputs[:3])
        if start is not None and limit is not None and isinstance(step, tvm.tirx.IntImm) and step.value > 0:
            if not (isinstance(start, tvm.tirx.IntImm) and isinstance(limit, tvm.tirx.IntImm)):
                return relax.op.arange(start, limit, step, "int64")
        return super()._impl_v12(bb, inputs, attr, params)


class Expand(ofe.Expand):
    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        data, shape = inputs[0], inputs[1]
        dims = data.ty.shape if isinstance(getattr(data, "ty", None), relax.TensorType) else None
        if isinstance(shape, tvm.ir.GenericConst) and dims is not None:
            target = [int(v) for v in shape.value.numpy().tolist()]
            have = list(dims.values)
            if any(not isinstance(d, tvm.tirx.IntImm) for d in have):
                n = max(len(target), len(have))
                have = [tvm.tirx.const(1, "int64")] * (n - len(have)) + have
                target = [1] * (n - len(target)) + target
                out = [h if t in (1, -1) else t for h, t in zip(have, target)]
                if n != len(dims.values):
                    data = bb.normalize(relax.op.reshape(data, have))
                return relax.op.broadcast_to(data, relax.ShapeExpr(out))
        return super()._impl_v13(bb, inputs, attr, params)


class Cast(ofe.Cast):
    FLOAT8E4M3FN = 17

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        x = inputs[0]
        ty = getattr(x, "ty", None)
        if attr.get("to") == cls.FLOAT8E4M3FN and isinstance(ty, relax.TensorType) and "float" in str(ty.dtype):
            from .lowerings import fp8_round

            return fp8_round(bb, x)
        return super()._impl_v13(bb, inputs, attr, params)


class Equal(ofe.Equal):
    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        if all(isinstance(getattr(x, "ty", None), relax.TensorType) and x.ty.dtype == "bool" for x in inputs):
            return relax.op.logical_not(relax.op.logical_xor(inputs[0], inputs[1]))
        return super()._impl_v13(bb, inputs, attr, params)


REPLACED = {"Cast": Cast, "Reshape": Reshape, "Concat": Concat, "Range": Range, "Expand": Expand, "Equal": Equal}


def fixed_map(stock: dict[str, type]) -> dict[str, type]:
    """The stock converter map with every fix above applied."""
    out = {}
    for name, conv in stock.items():
        conv = REPLACED.get(name, conv)
        if issubclass(conv, ofe.BinaryBase):
            out[name] = tensorizing(conv, binary=True)
        elif name in PRIM_AWARE or name in REPLACED:
            out[name] = conv
        else:
            out[name] = tensorizing(conv, binary=False)
    return out
