"""Measurement behind the noise twins' accumulation term (runtimes/eager.py ``accumulation_spread``, docs/parity.md).

    .venv/bin/python benchmarks/accumulation_spread.py [--k 64 256 1024 2048 4096 8192 16384] [--threads 2]

For each reduction length k: x [64, k] ~ N(0, 9), w [k, 512] ~ N(0, 1/k), y = x @ w three ways: torch fp32 (the eager
model's matmul), ONNX Runtime's MatMul on the CPU (MLAS, the artifact's), and numpy fp64 (exact enough). Reported:
the rms of |torch - fp64| and of |ORT - torch| in units of 2^-23 x rms(y) (the unit of ``accumulation_spread``),
and |ORT - torch| in fp32 ulps of each output (p50 / p90), next to the model min(3, 0.15 sqrt(k)). Prints a
markdown table; nothing is written.
"""

from __future__ import annotations

import argparse

import numpy as np


def measure(k: int, threads: int, seed: int = 0) -> dict:
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((64, k)) * 3).astype(np.float32)
    w = (rng.standard_normal((k, 512)) / np.sqrt(k)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 512])],
                          [numpy_helper.from_array(w, "w")])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    s = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
                             so, providers=["CPUExecutionProvider"])
    y_ort = s.run(None, {"x": x})[0].astype(np.float64)
    torch.set_num_threads(threads)
    y_t = (torch.from_numpy(x) @ torch.from_numpy(w)).numpy()
    y64 = x.astype(np.float64) @ w.astype(np.float64)
    unit = 2.0 ** -23 * np.sqrt((y64 ** 2).mean(-1, keepdims=True))
    ulps = np.abs(y_ort - y_t) / np.spacing(np.abs(y_t))
    y_t = y_t.astype(np.float64)
    return {"k": k, "torch_fp64": float(np.sqrt((((y_t - y64) / unit) ** 2).mean())),
            "ort_torch": float(np.sqrt((((y_ort - y_t) / unit) ** 2).mean())),
            "ulp_p50": float(np.quantile(ulps, 0.5)), "ulp_p90": float(np.quantile(ulps, 0.9)),
            "model": min(3.0, 0.15 * k ** 0.5)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, nargs="+", default=[64, 256, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    print("| k | torch vs fp64 | ORT vs torch | ORT vs torch, ulps p50 / p90 | model min(3, 0.15√k) |")
    print("|---:|---:|---:|---:|---:|")
    for k in a.k:
        r = measure(k, a.threads)
        print(f"| {k} | {r['torch_fp64']:.2f} | {r['ort_torch']:.2f} | {r['ulp_p50']:.0f} / {r['ulp_p90']:.0f} | "
              f"{r['model']:.2f} |")


if __name__ == "__main__":
    main()
