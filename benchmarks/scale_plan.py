"""Expert-parallel plan (issue [11], docs/scale.md): per-rank memory and all-reduce traffic computed from ModelArgs.

    .venv/bin/python benchmarks/scale_plan.py [--out docs/scale.md]

Plan (the anchors' layout, vLLM/SGLang and ORT GenAI's 8-rank V4 branch): attention, shared expert, embeddings,
head and MTP replicated on every rank; the routed experts sharded E/N per rank; the router global (every rank
computes the same top-k and keeps only its own experts' contributions); one all-reduce of the MoE output per MoE
layer. Weight bytes are the official checkpoint's (models/checkpoint.py: FP8 + E8M0 scales, MXFP4 experts); state
bytes are the decode state every rank holds in full (attention is replicated): the paper's compact layout
(models/state.compact_bytes_per_token) and the bf16 layout the artifacts would hold (models/state.bytes_per_token),
plus the fixed per-sequence part. Nothing is measured here: the numbers follow from the config.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from dsv4.models.checkpoint import DTYPES, expected_tensors
from dsv4.models.config import preset
from dsv4.models.state import bytes_per_token, compact_bytes_per_token

H200 = 141e9  # bytes of HBM3e (marketing GB); ~139 GiB usable is what the device tool reports
# Collective latency model, per all-reduce of n bytes over N ranks (ring): t = a + 2 (N-1)/N * n / bw.
LINKS = {  # (a: per-call latency s, bw: bytes/s per GPU) -- typical NCCL figures, not measured here
    "NVLink (one 8-GPU H200 node)": (8e-6, 400e9),
    "InfiniBand NDR 400 Gb/s (across nodes)": (20e-6, 45e9),
}
CONTEXTS = (8192, 131072, 1048576)
PLANS = (("flash", (4, 8)), ("pro", (8, 16)))


def weight_bytes(args) -> tuple[int, int]:
    """(routed-expert bytes, everything else) of the official checkpoint for `args`."""
    routed = other = 0
    for spec in expected_tensors(args).values():
        shape, sshape = spec.layout(spec.official_dtype)
        n = DTYPES[spec.official_dtype][0] * math.prod(shape)
        if sshape is not None:
            n += DTYPES["F8_E8M0"][0] * math.prod(sshape)
        if re.search(r"\.experts\.\d+\.", spec.name):
            routed += n
        else:
            other += n
    return routed, other


def state_bytes(args, tokens: int, compact: bool) -> float:
    """Decode-state bytes of one sequence holding `tokens` positions (window ring and partial states included)."""
    import torch

    wide = args.with_(compact_state=False)  # the bf16 float layout (models/state.py now defaults to the compact one)
    fixed = bytes_per_token(wide.with_(max_seq_len=max(tokens, 128)), torch.bfloat16)["fixed_per_sequence"]
    per = compact_bytes_per_token(args) if compact else bytes_per_token(wide, torch.bfloat16)["total_per_token"]
    return fixed + per * tokens


def allreduce_bytes(args, act_bytes: int = 2) -> int:
    """Bytes of MoE output each token all-reduces per forward: one [dim] vector per MoE layer (main layers)."""
    return args.n_layers * args.dim * act_bytes


def report() -> str:
    gb = 1e9
    lines = ["<!-- scale_plan:begin (benchmarks/scale_plan.py; computed from ModelArgs, nothing measured) -->",
             "| model | ranks | experts / rank | weights / rank (GB) | of which experts | replicated | "
             + " | ".join(f"state {c // 1024}K compact / bf16 (GB)" for c in CONTEXTS) + " | fits one H200 at 1M (compact) |",
             "|---|---|---|---|---|---|" + "---|" * len(CONTEXTS) + "---|"]
    traffic = []
    for name, ranks in PLANS:
        args = preset(name)
        routed, other = weight_bytes(args)
        total_gb = (routed + other) / gb
        for n in (1, *ranks):
            per = other + routed / n
            states = [(state_bytes(args, c, True), state_bytes(args, c, False)) for c in CONTEXTS]
            cells = " | ".join(f"{a / gb:.2f} / {b / gb:.2f}" for a, b in states)
            fits = "yes" if per + states[-1][0] <= H200 * 0.9 else "no"
            lines.append(f"| {name} ({total_gb:.1f} GB) | {n} | {args.n_routed_experts // n} | {per / gb:.1f} | "
                         f"{routed / n / gb:.1f} | {other / gb:.1f} | {cells} | {fits} |")
        ar = allreduce_bytes(args)
        for n in ranks:
            for link, (a, bw) in LINKS.items():
                if n > 8 and "NVLink" in link:
                    continue
                t1 = args.n_layers * (a + 2 * (n - 1) / n * args.dim * 2 / bw)
                t64 = args.n_layers * (a + 2 * (n - 1) / n * args.dim * 2 * 64 / bw)
                traffic.append(f"| {name} | {n} | {link} | {ar / 1e3:.0f} kB | {2 * (n - 1) / n * ar / 1e3:.0f} kB | "
                               f"{args.n_layers} | {t1 * 1e3:.2f} ms | {t64 * 1e3:.2f} ms |")
    lines += ["", "| model | ranks | link | all-reduce payload / token | sent per rank / token (ring) | all-reduces / "
              "forward | decode step, batch 1 | decode step, batch 64 |", "|---|---|---|---|---|---|---|---|", *traffic,
              "<!-- scale_plan:end -->"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="replace this script's section of a markdown file (e.g. docs/scale.md)")
    a = ap.parse_args()
    text = report()
    if a.out:
        p = Path(a.out)
        old = p.read_text() if p.exists() else ""
        if "<!-- scale_plan:begin" in old:
            head, rest = old.split("<!-- scale_plan:begin", 1)
            old = head + text + rest.split("<!-- scale_plan:end -->", 1)[1]
        else:
            old = old + ("\n" if old else "") + text + "\n"
        p.write_text(old)
    print(text)


if __name__ == "__main__":
    main()
