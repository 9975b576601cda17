"""Benchmark: a Flash-shaped synthetic checkpoint cut to N layers (default 2), written, verified and loaded.

    .venv/bin/python benchmarks/checkpoint_flash.py [--layers 2] [--out DIR] [--keep] [--perf docs/PERF.md]

Each step runs in its own process so that its peak RSS (ru_maxrss of that child alone) is measured:
1. ``dsv4 checkpoint make --preset flash --layers N`` (acceptance: peak RSS < 3 GB),
2. ``dsv4 checkpoint verify``, then with ``--check-values``,
3. ``DeepseekV4.from_pretrained(dir, keep_quantized=True)`` and a 16-token prefill on CPU.
With ``--perf`` the results replace this benchmark's section of docs/PERF.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import measure

LOAD = r"""
import json, sys, time, torch
from dsv4.models import DeepseekV4
t = time.perf_counter()
m = DeepseekV4.from_pretrained(sys.argv[1], keep_quantized=True, max_seq_len=4096, progress=False)  # not the 1M of config.json
load = time.perf_counter() - t
ids = torch.randint(0, m.args.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
t = time.perf_counter()
with torch.no_grad():
    logits, _ = m(ids)
pre = time.perf_counter() - t
packed = sum(1 for mod in m.modules() if getattr(mod, "packed", False))
print("@@" + json.dumps({"load_s": load, "prefill_s": pre, "logits_shape": list(logits.shape),
                         "finite": bool(torch.isfinite(logits).all()), "packed_linears": packed}))
"""



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out", default=None, help="checkpoint directory (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint")
    ap.add_argument("--perf", default=None, help="write the results into this PERF.md")
    a = ap.parse_args()
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="dsv4-flash-")) / "ckpt"
    cli = [sys.executable, "-m", "dsv4.tools.cli", "checkpoint"]
    try:
        make = measure([*cli, "make", "--preset", "flash", "--layers", str(a.layers), "--out", str(out), "--force",
                        "--no-progress"])
        files = sorted(out.glob("*.safetensors"))
        make["bytes"], make["shards"] = sum(f.stat().st_size for f in files), len(files)
        verify = measure([*cli, "verify", str(out), "--no-progress"])
        values = measure([*cli, "verify", str(out), "--check-values", "--no-progress"])
        load = measure([sys.executable, "-c", LOAD, str(out)])
    finally:
        if not a.keep:
            shutil.rmtree(out if a.out else out.parent, ignore_errors=True)
    res = {"layers": a.layers, "make": make, "verify": verify, "verify_values": values, "load_prefill": load,
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
           "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(res, indent=2))
    if a.perf:
        write_perf(Path(a.perf), res)
    return 0 if make["rss_kb"] < 3 * 10**6 else 1


def write_perf(path: Path, r: dict) -> None:
    """Replace (or append) this benchmark's section of PERF.md, delimited by HTML comments."""
    gb = 1e9
    m, v, lp = r["make"], r["verify"], r["load_prefill"]
    body = f"""<!-- checkpoint_flash:begin -->
## Synthetic Flash checkpoint, {r['layers']} layers (`benchmarks/checkpoint_flash.py`)

{r['date']}, {r['machine']}, CPU only. Flash dimensions (dim 4096, 256 MXFP4 experts, vocab 129280),
the first {r['layers']} layers + the MTP block, official dtypes; {m['shards']} shards of at most 2 GB,
{m['bytes'] / gb:.2f} GB on disk. Each step is a separate process; RSS = its peak resident set (ru_maxrss).
5-minute load average after make / verify / load: {m['loadavg_5min_after']:.1f} / {v['loadavg_5min_after']:.1f} /
{lp['loadavg_5min_after']:.1f} on {os.cpu_count()} cores (other jobs share the machine; wall times scale with it).

| step | wall time | peak RSS |
|---|---:|---:|
| `dsv4 checkpoint make --preset flash --layers {r['layers']}` | {m['wall_s']:.1f} s | {m['rss_kb'] * 1e3 / gb:.2f} GB |
| `dsv4 checkpoint verify` (headers only) | {v['wall_s']:.1f} s | {v['rss_kb'] * 1e3 / gb:.2f} GB |
| `dsv4 checkpoint verify --check-values` (reads all float data) | {r['verify_values']['wall_s']:.1f} s | {r['verify_values']['rss_kb'] * 1e3 / gb:.2f} GB |
| `from_pretrained(keep_quantized=True)` + 16-token prefill | {lp['wall_s']:.1f} s (load {lp['load_s']:.1f} s, prefill {lp['prefill_s']:.1f} s) | {lp['rss_kb'] * 1e3 / gb:.2f} GB |

Acceptance: `make` peak RSS under 3 GB. The loaded model holds {lp['packed_linears']} packed linears
(FP8 / MXFP4 bytes + E8M0 scales). safetensors 0.8 returns memory-mapped tensors, so packed weights stay
file-backed and only the pages a forward touches become resident; embedding and head are converted to fp32
copies (2 x 2.1 GB).
<!-- checkpoint_flash:end -->
"""
    text = path.read_text() if path.exists() else "# dsv4 performance notes\n\nMeasured numbers; each section names the script that produced it.\n"
    a, b = "<!-- checkpoint_flash:begin -->", "<!-- checkpoint_flash:end -->\n"
    if a in text and b in text:
        text = text[: text.index(a)] + body + text[text.index(b) + len(b):]
    else:
        text = text.rstrip("\n") + "\n\n" + body
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
