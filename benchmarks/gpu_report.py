"""What benchmarks/gpu_check.py reports: the bytes a decode step reads (the roofline's numerator) and the markdown
section ``gpu_check`` of docs/PERF.md."""

from __future__ import annotations

import time

TAG, TITLE = "gpu_check", "## ONNX Runtime CUDA and TVM CUDA on a GPU (`tools/gpu_check.sh`, issue [7])"


def active_bytes(args, batch: int, context: int, experts: str | None = None) -> dict[str, float]:
    """Bytes one decode step reads at `batch` sequences of `context` tokens, in the stored formats: every weight
    except the embedding (one row per sequence) and the MTP block; of the routed experts, the expected number of
    distinct ones the batch selects per layer under uniform routing (E·(1-(1-k/E)^batch)); the fp32 decode state up
    to `context` (window ring, compressed KV and indexer keys). experts="int8" (``--experts int8``): MXFP4 stacks
    as int8 codes (2x the packed bytes) with an fp32 scale and a uint8 zero point per block (5x the E8M0 bytes;
    passes/ort_weights.py mxfp4_dequantize_linear)."""
    import torch

    from dsv4.models.checkpoint_write import official_entries
    from dsv4.models.state import bytes_per_token

    E, k = args.n_routed_experts, args.n_activated_experts
    touched = E * (1 - (1 - k / E) ** batch)
    weights = 0.0
    for e in (e for g in official_entries(args) for e in g):
        if e.name.startswith("mtp."):
            continue
        if e.name == "embed.weight":
            weights += batch * e.nbytes / e.shape[0]
        elif ".ffn.experts." in e.name:
            mxfp4 = e.spec.official_dtype == "I8"  # the packed e2m1 codes and their E8M0 scales; FP8 experts stay
            grow = (5 if e.dtype == "F8_E8M0" else 2) if experts == "int8" and mxfp4 else 1
            weights += e.nbytes * touched / E * grow
        else:
            weights += e.nbytes
    per = bytes_per_token(args, torch.float32)  # per-token entries amortised over the capacity; the ring is fixed
    state = batch * (per["fixed_per_sequence"] + context * per["total_per_token"])
    return {"weights": weights, "state": state, "total": weights + state, "experts per layer": touched}


def render(plans: list, backends: list[str], a, results: dict, notes: dict, secs: dict, gpu: str) -> str:
    """The section: one line per model (`plans`: gpu_check.Plan), the active bytes, the measured table."""
    lines = [TITLE, "", f"{time.strftime('%Y-%m-%d')}, {gpu}. `tools/gpu_check.sh`: packed FP8/MXFP4 weights, the "
             f"quantisation simulation on, fp32; tvm-cuda {a.arch}. " + ("**Dry run: nothing ran on a GPU.**"
                                                                        if a.dry_run else
                                                                        f"Device bandwidth {notes['bandwidth GB/s']:,.0f} GB/s "
                                                                        "(device-to-device copy)."), ""]
    for p in plans:
        x = p.args
        lines.append(f"- {p.name}: {x.n_layers} layers (compress ratios {list(x.compress_ratios[:x.n_layers])}), dim "
                     f"{x.dim}, {x.n_routed_experts} routed experts (top-{x.n_activated_experts}), vocab {x.vocab_size}, "
                     f"max_seq_len {x.max_seq_len}; " + ", ".join(f"{k} {v:.0f} s" for k, v in secs.get(p.name, {}).items())
                     + (f"; {notes[p.name + ' eager']}" if f"{p.name} eager" in notes else ""))
    lines += ["", "Active bytes per decode step (stored formats, context "
              f"{a.decode_context}" + ("; ort-cuda-int8's roofline counts its int8 experts instead"
                                       if "ort-cuda-int8" in backends else "") + "):", "", "| model | batch | weights (MB) | state (MB) | experts read per layer |",
              "|---|---:|---:|---:|---:|"]
    for p in plans:
        for b in a.batches:
            ab = active_bytes(p.args, b, a.decode_context)
            lines.append(f"| {p.name} | {b} | {ab['weights'] / 1e6:,.1f} | {ab['state'] / 1e6:,.1f} | "
                         f"{ab['experts per layer']:.1f} |")
    cols = [f"{p.name} {b}" for p in plans for b in backends]
    rows = list(dict.fromkeys(k for c in cols for k in results.get(c, {})))
    if rows:
        lines += ["", "| measurement | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        lines += [f"| {r} | " + " | ".join(_fmt(results.get(c, {}).get(r)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)


def gpu_name() -> str:
    import subprocess

    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "no GPU"
