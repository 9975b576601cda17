"""Relax module -> compiled library -> Relax VM, with the weights fed at run time from the artifact.

Pipeline (``build``): legalize (Relax ops -> TIR) -> fuse -> schedule (schedules.py: the dsv4 kernels' own
schedules; CUDA: dlight's GPU rules for the standard ops; llvm: TVM's CPU codegen runs their TIR as written) -> lower to the VM -> ``tvm.compile``. Weights are
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
from .schedules import census_pass, gpu_schedule, is_cuda, schedule_kernels

__all__ = ["build", "is_cuda", "make_target", "passes", "schedule_kernels"]

TARGETS = ("tvm-llvm", "tvm-cuda")
DEFAULT_ARCH = "sm_90"


def make_target(name: str, arch: str = DEFAULT_ARCH) -> tvm.target.Target:
    """JSON-dict targets (TVM 0.27 rejects CLI strings); CUDA always with an explicit arch."""
    if name == "tvm-llvm":
        return tvm.target.Target({"kind": "llvm"})
    if name == "tvm-cuda":
        return tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
    raise ValueError(f"--target: {name!r} is not a TVM target; choose from {', '.join(TARGETS)}")


def passes(target: tvm.target.Target, census: dict | None = None) -> list:
    """The Relax pipeline, step by step (mirrors TVM's per-backend default pipelines, scheduling explicit:
    schedules.py). `census`, when given, receives {PrimFunc name: schedule name} once everything is scheduled."""
    T = relax.transform
    steps = [T.DeadCodeElimination(), relax.backend.DispatchSampling(), relax.backend.DispatchSortScan(),
             T.LegalizeOps(), T.AnnotateTIROpPattern(), T.FoldConstant(), T.FuseOps(), T.FuseTIR(),
             schedule_kernels(target)]
    if is_cuda(target):
        steps.append(gpu_schedule(target))
    if census is not None:
        steps.append(census_pass(census))
    steps += [T.RewriteDataflowReshape(), T.ToNonDataflow(), T.RemovePurityChecking(), T.CallTIRRewrite(),
              T.StaticPlanBlockMemory()]
    if is_cuda(target):
        steps.append(T.RewriteCUDAGraph())
    steps += [T.LowerAllocTensor(), T.KillAfterLastUse(), T.LowerRuntimeBuiltin(), T.ComputePrimValue(),
              T.VMShapeLower(), T.AttachGlobalSymbol()]
    return steps


def build(mod: tvm.IRModule, target: tvm.target.Target, census: dict | None = None):
    """Compile a Relax module (from frontend.import_model) for `target`; returns a relax Executable. `census`:
    see passes."""

    @tvm.transform.module_pass(opt_level=0, name="dsv4_pipeline")
    def pipeline(m, _ctx):
        with target:
            return tvm.transform.Sequential(passes(target, census))(m)

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
        done = subprocess.run([nvcc, "-ptx", f"-arch={arch}", "-O3", "-o", str(out), str(cu)], capture_output=True,
                              text=True)
    if done.returncode:
        raise RuntimeError(f"nvcc -ptx -arch={arch} rejected the CUDA source:\n{_errors(done.stderr)}")
    return out


def ptxas(path: Path, arch: str) -> None:
    """Assemble a PTX file for `arch` (``ptxas -arch=sm_90 -o /dev/null``): what the driver does at load time."""
    import shutil
    import subprocess

    exe = shutil.which("ptxas")
    if exe is None:
        raise FileNotFoundError("ptxas not found on PATH")
    done = subprocess.run([exe, f"-arch={arch}", str(path), "-o", "/dev/null"], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ptxas -arch={arch} rejected {path.name}:\n{_errors(done.stderr)}")


def _errors(stderr: str, most: int = 20) -> str:
    lines = [ln for ln in stderr.splitlines() if "error" in ln.lower()] or stderr.splitlines()
    return "\n".join(lines[:most]) + (f"\n... {len(lines) - most} more" if len(lines) > most else "")


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
