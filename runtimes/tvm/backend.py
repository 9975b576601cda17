"""Relax module -> compiled library -> Relax VM, with the weights fed at run time from the artifact.

Pipeline (``build``): legalize (Relax ops -> TIR) -> fuse -> schedule (CUDA: dlight's default GPU rules;
llvm: none, TVM's CPU codegen runs the TIR as written) -> lower to the VM -> ``tvm.compile``. Weights are
function parameters (frontend.py turned every external-data initializer into an input), so nothing is folded
into the library and one library serves any checkpoint of the same shape. ``Weights`` maps the artifact's
shared external-data file once and hands the same device tensors to the prefill and decode graphs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from .frontend import Param

TARGETS = ("tvm-llvm", "tvm-cuda")
DEFAULT_ARCH = "sm_90"


def make_target(name: str, arch: str = DEFAULT_ARCH) -> tvm.target.Target:
    """JSON-dict targets (TVM 0.27 rejects CLI strings); CUDA always with an explicit arch."""
    if name == "tvm-llvm":
        return tvm.target.Target({"kind": "llvm"})
    if name == "tvm-cuda":
        return tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
    raise ValueError(f"--target: {name!r} is not a TVM target; choose from {', '.join(TARGETS)}")


def is_cuda(target: tvm.target.Target) -> bool:
    return target.kind.name == "cuda"


# ---- schedules of the dsv4 kernels (lowerings.emit_kernel's hints) -----------------------------------------------
GPU_THREADS = 64


def _row_schedule(func: tvm.tirx.PrimFunc, target: tvm.target.Target) -> tvm.tirx.PrimFunc:
    """Fuse the first `rows` axes of the last stage into one row loop and compute every producer under it, so a
    row's intermediates stay local. CPU: the row loop runs in parallel. GPU, per="thread": one thread per row,
    intermediates in registers; per="block": one thread block per row, each stage's first inner spatial axis
    (else its reduction, as a cross-thread reduction) spread over the threads, intermediates in shared memory."""
    from tvm import s_tir

    rows, per = int(func.attrs["dsv4.rows"]), str(func.attrs["dsv4.per"])
    sch = s_tir.Schedule(func)
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))

    def row_loop(blk):
        loops = sch.get_loops(blk)
        return sch.fuse(*loops[:rows]) if rows > 1 else loops[0]

    loop = row_loop(blocks[-1])
    inner = [blocks[-1]]
    for blk in reversed(blocks[:-1]):
        if sch.get_consumers(blk):
            sch.compute_at(blk, loop)
            inner.insert(0, blk)
    heads = [loop] + [row_loop(b) for b in blocks[:-1] if b not in inner]
    gpu = is_cuda(target)
    for head in heads:
        if not gpu:
            sch.parallel(head)
        elif per == "thread":
            bx, tx = sch.split(head, [None, GPU_THREADS])
            sch.bind(bx, "blockIdx.x")
            sch.bind(tx, "threadIdx.x")
        else:
            sch.bind(head, "blockIdx.x")
    if gpu:
        for blk in inner[:-1]:
            sch.set_scope(blk, 0, "local" if per == "thread" else "shared")
        if per == "block":
            # TE order: a stage's own spatial axes, then its reduction; the first one is spread over the threads.
            spread = [(blk, sch.get_loops(blk)[1]) for blk in inner if len(sch.get_loops(blk)) > 1]
            n = _threads([sch.get(loop).extent for _, loop in spread])
            for _, loop in spread:
                _, tx = sch.split(loop, [None, n])
                sch.bind(tx, "threadIdx.x")
    return sch.mod["main"].with_attr("tir.is_scheduled", True)


def _threads(extents) -> int:
    """Threads per block: the largest power of two <= GPU_THREADS dividing every (static) extent, so that no
    stage needs a bounds guard (TVM cannot place the barriers between stages inside one)."""
    n = GPU_THREADS
    for e in extents:
        if not isinstance(e, tvm.tirx.IntImm):
            return 1
        while int(e.value) % n:
            n //= 2
    return n


def schedule_kernels(target: tvm.target.Target):
    """Module pass: give every dsv4 kernel that carries row hints its row schedule (before dlight, which then
    skips it as already scheduled)."""

    @tvm.transform.module_pass(opt_level=0, name="dsv4_schedule_kernels")
    def run(mod, _ctx):
        for gv, func in list(mod.functions_items()):
            if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and "dsv4.rows" in func.attrs \
                    and not func.attrs.get("tir.is_scheduled", False) \
                    and not (is_cuda(target) and func.attrs["dsv4.per"] == "cpu"):
                mod[gv] = _row_schedule(func, target)
        return mod

    return run


def _spatial_schedule(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """GPU schedule of a function of spatial blocks without splitting symbolic loops: each block's innermost loop
    (static) over threads, the others fused over thread blocks. dlight's Fallback splits the fused loop, which
    TVM 0.27 cannot prove for extents like ``batch * (length + 384) * 128`` (the KV concatenations of prefill)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    for blk in sch.get_child_blocks(sch.get_sblock("root")):
        if any(int(v.iter_type) != 0 for v in sch.get(blk).iter_vars):
            raise ValueError(f"{func}: block {sch.get(blk).name_hint} is not spatial")
        *outer, last = sch.get_loops(blk)
        extent = sch.get(last).extent
        if not isinstance(extent, tvm.tirx.IntImm):
            raise ValueError("innermost loop is symbolic")
        if int(extent.value) > 1024:
            last, inner = sch.split(last, [None, GPU_THREADS])
            outer.append(last)
            last = inner
        sch.bind(last, "threadIdx.x")
        sch.bind(sch.fuse(*outer) if len(outer) > 1 else outer[0], "blockIdx.x") if outer else None
    return sch.mod["main"].with_attr("tir.is_scheduled", True)


def gpu_schedule(dlight_pass):
    """dlight's default GPU schedules, function by function; where dlight fails on symbolic shapes, the spatial
    schedule above (and if that does not apply either, dlight's error, naming the function)."""

    @tvm.transform.module_pass(opt_level=0, name="dsv4_gpu_schedule")
    def run(mod, _ctx):
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, tvm.tirx.PrimFunc) or (func.attrs is not None and
                                                          func.attrs.get("tir.is_scheduled", False)):
                continue
            try:
                mod[gv] = dlight_pass(tvm.IRModule({gv: func}))[gv]
            except Exception as err:  # noqa: BLE001 - TVM raises InternalError subclasses of many kinds
                try:
                    mod[gv] = _spatial_schedule(func)
                except Exception:  # noqa: BLE001
                    raise RuntimeError(f"no GPU schedule for {gv.name_hint}: {err}") from err
        return mod

    return run


def passes(target: tvm.target.Target) -> list:
    """The Relax pipeline, step by step (mirrors TVM's per-backend default pipelines, scheduling explicit)."""
    from tvm.s_tir import dlight as dl

    T = relax.transform
    steps = [T.DeadCodeElimination(), relax.backend.DispatchSampling(), relax.backend.DispatchSortScan(),
             T.LegalizeOps(), T.AnnotateTIROpPattern(), T.FoldConstant(), T.FuseOps(), T.FuseTIR(),
             schedule_kernels(target)]
    if is_cuda(target):
        steps.append(gpu_schedule(dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                                          dl.gpu.GeneralReduction(), dl.gpu.Fallback())))
    steps += [T.RewriteDataflowReshape(), T.ToNonDataflow(), T.RemovePurityChecking(), T.CallTIRRewrite(),
              T.StaticPlanBlockMemory()]
    if is_cuda(target):
        steps.append(T.RewriteCUDAGraph())
    steps += [T.LowerAllocTensor(), T.KillAfterLastUse(), T.LowerRuntimeBuiltin(), T.ComputePrimValue(),
              T.VMShapeLower(), T.AttachGlobalSymbol()]
    return steps


def build(mod: tvm.IRModule, target: tvm.target.Target):
    """Compile a Relax module (from frontend.import_model) for `target`; returns a relax Executable."""

    @tvm.transform.module_pass(opt_level=0, name="dsv4_pipeline")
    def pipeline(m, _ctx):
        with target:
            return tvm.transform.Sequential(passes(target))(m)

    return tvm.compile(mod, target=target, relax_pipeline=pipeline)


def cuda_source(ex) -> str:
    """The CUDA C source of an executable built for tvm-cuda (held by the device module, compiled at load)."""
    lib = ex.mod if hasattr(ex, "mod") else ex
    for m in _modules(lib):
        if m.kind in ("cuda", "cuda_fallback") or "cuda" in m.kind:
            return m.inspect_source("cu") or m.inspect_source("")
    raise ValueError("no CUDA module in this executable (built for llvm?)")


def _modules(lib) -> Iterable:
    yield lib
    for sub in lib.imports:
        yield from _modules(sub)


def ptx(source: str, arch: str, out: Path) -> Path:
    """CUDA source -> PTX for `arch` with nvcc (``nvcc -ptx -arch=sm_90``)."""
    import shutil
    import subprocess
    import tempfile

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc not found on PATH (needed for PTX)")
    with tempfile.TemporaryDirectory(prefix="dsv4-ptx-") as tmp:
        cu = Path(tmp) / "kernels.cu"
        cu.write_text(source)
        subprocess.run([nvcc, "-ptx", f"-arch={arch}", "-O3", "-o", str(out), str(cu)], check=True,
                       capture_output=True, text=True)
    return out


def device_of(target_name: str, index: int = 0):
    return tvm.cuda(index) if target_name == "tvm-cuda" else tvm.cpu(index)


# ---- weights ---------------------------------------------------------------------------------------------------
class Weights:
    """Device tensors of an artifact's weights, read once from its external-data file(s) and shared."""

    def __init__(self, root: str | Path, device):
        self.root, self.device = Path(root), device
        self._maps: dict[str, np.memmap] = {}
        self._cache: dict[str, tvm.runtime.Tensor] = {}

    def _map(self, location: str) -> np.memmap:
        if location not in self._maps:
            path = (self.root / location).resolve()
            if self.root.resolve() not in path.parents:
                raise ValueError(f"weights: {location!r} escapes the artifact directory {self.root}")
            self._maps[location] = np.memmap(path, dtype=np.uint8, mode="r")
        return self._maps[location]

    def array(self, p: Param) -> np.ndarray:
        raw = self._map(p.location)[p.offset:p.offset + p.length]
        return np.frombuffer(raw, dtype=np.dtype(p.dtype)).reshape(p.shape)

    def get(self, p: Param) -> tvm.runtime.Tensor:
        if p.name not in self._cache:
            self._cache[p.name] = tvm.runtime.tensor(np.ascontiguousarray(self.array(p)), self.device)
        return self._cache[p.name]

    def nbytes(self) -> int:
        return sum(int(np.prod(t.shape)) * np.dtype(str(t.dtype)).itemsize for t in self._cache.values())


# ---- one compiled graph ----------------------------------------------------------------------------------------
class CompiledGraph:
    """A loaded graph library bound to its weights: ``outs = g.run({name: array or tvm tensor})``."""

    def __init__(self, lib, inputs: Sequence[str], outputs: Sequence[str], params: Sequence[Param],
                 weights: Weights):
        self.inputs, self.outputs, self.params = list(inputs), list(outputs), list(params)
        self.device = weights.device
        self.vm = relax.VirtualMachine(lib, self.device)
        self._fn = self.vm["main"]
        self._weights = [weights.get(p) for p in self.params]

    def tensor(self, x) -> tvm.runtime.Tensor:
        if isinstance(x, tvm.runtime.Tensor):
            return x
        return tvm.runtime.tensor(np.ascontiguousarray(x), self.device)

    def run(self, feeds: dict) -> dict[str, tvm.runtime.Tensor]:
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise KeyError(f"missing graph inputs: {', '.join(missing)}")
        outs = self._fn(*[self.tensor(feeds[n]) for n in self.inputs], *self._weights)
        return dict(zip(self.outputs, [outs] if isinstance(outs, tvm.runtime.Tensor) else outs))
