"""The decode state's bytes of a Flash-shaped artifact (issue 13 acceptance; docs/state_layout.md).

A 2-layer slice with the release's attention (dim 4096, 64 heads of 512, rope 64, indexer 64 x 128, window 128,
capacity 1,048,576), one CSA and one HCA layer (compress_ratios 4, 128), is written as a sparse synthetic checkpoint
and exported for ort-cpu with 16-bit activations (--weights float16) and in fp32; ``dsv4 inspect`` then reports its
bytes per token and, scaled by the release's layer mix, Flash's and Pro's. The routed experts are cut to 8 (the
state does not depend on the MoE; 256 experts in fp16 would write 26 GB for nothing measured here).

    python benchmarks/state_bytes_flash.py [--work DIR] [--weights float16,float32]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=None, help="directory for the checkpoint and artifacts (default: a temporary one)")
    p.add_argument("--weights", default="float16,float32", help="export weight modes, comma-separated")
    a = p.parse_args(argv)

    from dsv4.export.artifact import inspect_artifact
    from dsv4.export.export import export_artifact
    from dsv4.models.checkpoint_write import write_synthetic
    from dsv4.models.config import preset

    args = preset("flash", n_layers=4).with_(n_layers=2, compress_ratios=(4, 128, 0), n_hash_layers=2,
                                               n_routed_experts=8)
    with tempfile.TemporaryDirectory(prefix="dsv4-state-") as tmp:
        work = Path(a.work or tmp)
        t = time.perf_counter()
        ck = write_synthetic(args, work / "ckpt", sparse=True, overwrite=True, progress=False)
        print(f"checkpoint: {time.perf_counter() - t:.0f} s", flush=True)
        for w in a.weights.split(","):
            t = time.perf_counter()
            res = export_artifact(work / f"art_{w}", checkpoint=ck, weights=w, overwrite=True, progress=False)
            print(f"export --weights {w}: {time.perf_counter() - t:.0f} s", flush=True)
            st = inspect_artifact(res.path)["state"]
            print(f"--weights {w}: {st['layout']} layout, {st['bytes_per_token']:,.1f} B/token in this slice;",
                  "; ".join(f"{n}: {r['per_token']:,.1f} B/token" for n, r in st["release"].items()), flush=True)
            subprocess.run([str(Path(sys.executable).with_name("dsv4")), "inspect", str(res.path), "--top", "3"],
                           check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
