"""Schedules of the compiled graphs' PrimFuncs, and the census of which schedule each one got (docs/tvm.md).

* ``dsv4-row`` (``schedule_kernels``): the dsv4 kernels with row hints (lowerings.emit_kernel), CPU and GPU;
* ``dsv4-linear``: Fp8Linear / Mxfp4Linear on GPUs, the dequant inside a split-K reduction over a warp;
* dlight's rules (``Matmul``, ``GEMV``, ``Reduction``, ``GeneralReduction``, ``Fallback``) for the standard ops;
* ``spatial``: a split-free schedule of spatial functions (dsv4 dequant / rounding kernels, and where dlight
  fails on symbolic extents);
* ``tvm-dispatch``: kernels TVM schedules itself (sort / top-k / cumsum of DispatchSortScan); ``none``: not
  scheduled (llvm).

Every scheduled PrimFunc carries its schedule's name in the attribute ``dsv4.schedule``; ``census`` reads them.
"""

from __future__ import annotations

from collections import Counter

import tvm

SCHEDULED = "tirx.is_scheduled"  # TVM 0.27's key (dlight and MetaSchedule skip such functions)
SCHEDULE = "dsv4.schedule"
ROW, LINEAR, SPATIAL, FALLBACK = "dsv4-row", "dsv4-linear", "spatial", "Fallback"
UNSCHEDULED = "none"  # llvm: TVM's CPU codegen runs the TIR as written
DISPATCHED = "tvm-dispatch"  # TVM's own scheduled kernels (DispatchSortScan: topk, cumsum)
KERNEL_PREFIX = "dsv4_"
GPU_THREADS = 64
LINEAR_TX, LINEAR_TY = 32, 8  # dsv4-linear: one warp per output element's reduction, up to 8 outputs per block


def _done(sch, name: str) -> tvm.tirx.PrimFunc:
    return sch.mod["main"].with_attr(SCHEDULED, True).with_attr(SCHEDULE, name)


def is_cuda(target: tvm.target.Target) -> bool:
    return target.kind.name == "cuda"


def _scheduled(func) -> bool:
    return func.attrs is not None and bool(func.attrs.get(SCHEDULED, False))


def _hint(func, key: str, default=None):
    return default if func.attrs is None or key not in func.attrs else func.attrs[key]


# ---- dsv4-row: the kernels with row hints ----------------------------------------------------------------------
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
            n = _pow2_divisor([sch.get(loop).extent for _, loop in spread], GPU_THREADS)
            for _, loop in spread:
                _, tx = sch.split(loop, [None, n])
                sch.bind(tx, "threadIdx.x")
    return _done(sch, ROW)


def _pow2_divisor(extents, most: int) -> int:
    """The largest power of two <= `most` dividing every (static) extent, so that no stage needs a bounds guard
    (TVM cannot place the barriers between stages inside one); 1 when an extent is symbolic."""
    n = most
    for e in extents:
        if not isinstance(e, tvm.tirx.IntImm):
            return 1
        while int(e.value) % n:
            n //= 2
    return n


_threads = _pow2_divisor  # the name the row schedule's tests knew


def schedule_kernels(target: tvm.target.Target):
    """Module pass: give every dsv4 kernel that carries row hints its row schedule (before dlight, which then
    skips it as already scheduled). On GPUs the kernels hinted per="cpu" / "linear" are left to gpu_schedule."""

    @tvm.transform.module_pass(opt_level=0, name="dsv4_schedule_kernels")
    def run(mod, _ctx):
        for gv, func in list(mod.functions_items()):
            if isinstance(func, tvm.tirx.PrimFunc) and _hint(func, "dsv4.rows") is not None \
                    and not _scheduled(func) \
                    and not (is_cuda(target) and str(func.attrs["dsv4.per"]) in ("cpu", "linear")):
                mod[gv] = _row_schedule(func, target)
        return mod

    return run


# ---- dsv4-linear: Fp8Linear / Mxfp4Linear on GPUs --------------------------------------------------------------
def _linear_schedule(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """y[m, o] = sum_k x[m, k] * dequant(w)[o, k] (+ a cast epilogue), for any symbolic m (batch, batch*length).

    One thread block per (m, tile of TY outputs): threadIdx.y picks the output, the 32 lanes of a warp
    (threadIdx.x) split k, each accumulating its slice in a register with the weight decoded in the loop (the
    rfactor block), then a warp reduction (cross-thread allreduce) writes y. m is only fused with the static
    output-tile count, never split, so nothing needs a proof about a symbolic extent."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    y = sch.get_sblock("y")
    epilogue = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if sch.get(b).name_hint != "y"]
    m, o, k = sch.get_loops(y)
    ty = _pow2_divisor([sch.get(o).extent], LINEAR_TY)
    tx = _pow2_divisor([sch.get(k).extent], LINEAR_TX)
    oo, oi = sch.split(o, [None, ty])
    ko, ki = sch.split(k, [None, tx])
    bx = sch.fuse(m, oo)
    sch.reorder(bx, oi, ki, ko)
    rf = sch.rfactor(ki, 0)
    bx, oi, ki, ko = sch.get_loops(rf)
    sch.bind(bx, "blockIdx.x")
    sch.bind(oi, "threadIdx.y")
    sch.bind(ki, "threadIdx.x")
    sch.set_scope(rf, 0, "local")
    sch.decompose_reduction(rf, ko)
    sch.reverse_compute_at(y, oi, preserve_unit_loops=True)
    red, *unit = sch.get_loops(y)[2:]  # the lanes' partial sums, then unit (m, o) loops: the lanes go innermost
    if unit:
        sch.reorder(*unit, red)
    sch.bind(red, "threadIdx.x")
    for blk in epilogue:  # the cast to the activation dtype, per output, after the reduction
        sch.set_scope(y, 0, "local")
        sch.reverse_compute_at(blk, oi, preserve_unit_loops=True)
    return _done(sch, LINEAR)


# ---- spatial: split-free, for symbolic extents -----------------------------------------------------------------
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
    return _done(sch, SPATIAL)


# ---- the GPU pass: every PrimFunc gets one schedule ------------------------------------------------------------
def dlight_rules() -> list:
    from tvm.s_tir import dlight as dl

    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


def _simt_view(target: tvm.target.Target) -> tvm.target.Target:
    """`target` as dlight's Matmul should see it: a CUDA arch below sm_70. For fp16 matmuls on sm_70+ the rule
    first tries tensor-core tensorization (MatmulTensorization), which SEGFAULTS inside s_tir Tensorize in TVM
    0.27 on the float16 graphs (it kills the process, nothing to catch); the SIMT tiling is used instead."""
    if not is_cuda(target):
        return target
    return tvm.target.Target({"kind": "cuda", "arch": "sm_60"}, host=target.host)


def _dlight(func: tvm.tirx.PrimFunc, target: tvm.target.Target, rules: list, errors: list):
    """The first dlight rule that schedules `func`, as (func, rule name); a rule that raises is skipped (its
    error kept), as dlight's GEMV does on the dequant-matmuls."""
    from tvm.s_tir import dlight as dl

    for rule in rules:
        try:
            space = rule.apply(func, _simt_view(target) if isinstance(rule, dl.gpu.Matmul) else target, False)
        except Exception as err:  # noqa: BLE001 - TVM raises InternalError subclasses of many kinds
            errors.append(f"{type(rule).__name__}: {err}".splitlines()[0])
            continue
        if space is not None:
            sch = space if not isinstance(space, list) else space[0]
            return _done(sch, type(rule).__name__)
    return None


def gpu_schedule(target: tvm.target.Target, rules: list | None = None):
    """Every PrimFunc not scheduled yet gets, in order: dsv4 linear kernels their own schedule; the other dsv4
    kernels the spatial schedule; standard ops the first dlight rule that applies (then spatial where dlight
    fails on symbolic shapes). A dsv4 kernel that would end on dlight's Fallback is an error, naming it."""
    rules = dlight_rules() if rules is None else rules

    @tvm.transform.module_pass(opt_level=0, name="dsv4_gpu_schedule")
    def run(mod, _ctx):
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, tvm.tirx.PrimFunc) or _scheduled(func):
                continue
            name, errors, new = gv.name_hint, [], None
            kernel = name.startswith(KERNEL_PREFIX)
            if str(_hint(func, "dsv4.per", "")) == "linear":
                new = _linear_schedule(func)
            elif kernel:
                try:
                    new = _spatial_schedule(func)
                except Exception as err:  # noqa: BLE001
                    errors.append(f"spatial: {err}".splitlines()[0])
            if new is None:
                new = _dlight(func, target, rules, errors)
            if new is None and not kernel:
                try:
                    new = _spatial_schedule(func)
                except Exception as err:  # noqa: BLE001
                    errors.append(f"spatial: {err}".splitlines()[0])
            if new is None:
                raise RuntimeError(f"no GPU schedule for {name}: {'; '.join(errors)}")
            if kernel and str(new.attrs[SCHEDULE]) == FALLBACK:
                raise RuntimeError(f"dsv4 kernel {name} got dlight's generic Fallback schedule; give it a schedule "
                                   f"in runtimes/tvm/schedules.py ({'; '.join(errors) or 'no other rule applied'})")
            mod[gv] = new
        return mod

    return run


# ---- census ----------------------------------------------------------------------------------------------------
def census_pass(into: dict):
    """Module pass recording {PrimFunc name: schedule name} of the module into `into` (changes nothing)."""

    @tvm.transform.module_pass(opt_level=0, name="dsv4_census")
    def run(mod, _ctx):
        for gv, func in mod.functions_items():
            if isinstance(func, tvm.tirx.PrimFunc):
                into[gv.name_hint] = str(_hint(func, SCHEDULE, DISPATCHED if _scheduled(func) else UNSCHEDULED))
        return mod

    return run


def census_counts(kernels: dict[str, str]) -> dict[str, int]:
    return dict(sorted(Counter(kernels.values()).items(), key=lambda kv: (-kv[1], kv[0])))
