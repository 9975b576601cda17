"""export/stream.py and export/layers.py: the bounded-memory weights writer, checkpoint slices, sparse checkpoints,
the expert storage option and the per-kind layer plan (issue [9])."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from dsv4.export import layers, stream
from dsv4.export.experts import expert_mode
from dsv4.export.weights import CheckpointSource
from dsv4.models.checkpoint import validate
from dsv4.models.checkpoint_io import Checkpoint
from dsv4.models.checkpoint_write import write_synthetic
from dsv4.models.config import preset


def test_read_raw_equals_the_mapped_read(tiny_checkpoint):
    """pread reads (whole tensors and row slices) equal safetensors' memory-mapped ones, byte for byte."""
    ck = Checkpoint(tiny_checkpoint)
    for name in list(ck.tensors)[::7]:
        a, b = ck.read(name), ck.read_raw(name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.element_size() == 1 else torch.equal(a, b)
        if a.dim() and a.shape[0] > 3:
            assert torch.equal(ck.read(name, slice(1, 3)).view(torch.uint8), ck.read_raw(name, slice(1, 3)).view(torch.uint8))


def test_copy_keeps_bytes_and_holes(tmp_path):
    """A kernel copy of a range with holes: the same bytes, and the holes stay holes (no disk blocks)."""
    src = tmp_path / "src"
    with open(src, "wb") as f:
        f.write(b"a" * 10_000)
        f.seek(5 << 20)
        f.write(b"b" * 7_000)
        f.truncate(12 << 20)
    wf = stream.WeightsFile(tmp_path / "out")
    wf.write(torch.arange(3, dtype=torch.uint8))
    wf.copy(src, 100, (12 << 20) - 100)
    wf.close()
    out = (tmp_path / "out").read_bytes()
    assert out[:3] == bytes([0, 1, 2]) and out[3:] == src.read_bytes()[100:]
    assert wf.sha256 == hashlib.sha256(out).hexdigest()  # hashed while written, holes as the zeros they read as
    assert os.stat(tmp_path / "out").st_blocks * 512 < 1 << 20


def test_sparse_checkpoint_is_valid_and_takes_no_space(tmp_path):
    """``checkpoint make --sparse``: the official layout and headers, zero data stored as holes."""
    out = write_synthetic(preset("tiny"), tmp_path / "ck", sparse=True, progress=False)
    assert validate(out).ok
    files = list(out.glob("*.safetensors"))
    assert sum(f.stat().st_size for f in files) > 1 << 20
    assert sum(f.stat().st_blocks * 512 for f in files) < 256 << 10
    ck = Checkpoint(out)
    assert not ck.read_raw("layers.0.ffn.experts.0.w1.weight").any()


def test_layers_slices_a_checkpoint(tiny_checkpoint):
    """--layers N: the first N decoder layers (+ head and MTP) of any checkpoint, its schedule cut to match."""
    src = CheckpointSource(tiny_checkpoint, layers=2)
    full = preset("tiny")
    assert src.args.n_layers == 2
    assert src.args.compress_ratios == full.compress_ratios[:2] + full.compress_ratios[full.n_layers:]
    assert src.args.n_hash_layers == min(full.n_hash_layers, 2)
    assert "layers.1.attn.wq_a.weight" in src and "layers.2.attn.wq_a.weight" not in src and "mtp.0.norm.weight" in src
    for bad in (0, full.n_layers + 1):
        with pytest.raises(ValueError, match="--layers"):
            CheckpointSource(tiny_checkpoint, layers=bad)


def test_expert_mode():
    """packed by default on the ORT targets (ort-cpu, ort-cuda); int8 on request; refused where it means nothing."""
    for target in ("ort-cpu", "ort-cuda"):
        assert expert_mode(target, "packed", None) == "packed"
        assert expert_mode(target, "packed", "int8") == "int8"
    assert expert_mode("tvm-llvm", "packed", None) is None
    assert expert_mode("ort-cpu", "float32", None) is None
    for target, weights, experts in (("ort-cpu", "packed", "fp4"), ("tvm-llvm", "packed", "int8"),
                                     ("tvm-cuda", "packed", "packed"), ("ascend", "float16", "int8"),
                                     ("ort-cuda", "float32", "int8"), ("ort-cpu", "float32", "packed")):
        with pytest.raises(ValueError, match="--experts"):
            expert_mode(target, weights, experts)


class _Src:
    """A checkpoint-like source whose `w` is stored BF16."""

    class ck:  # noqa: N801
        tensors = {"w": type("T", (), {"dtype": "BF16"})()}


def test_bf16_initializers_on_ort_cpu_only():
    """BF16 checkpoint tensors stay BF16 (+ a per-call Cast) where memory beats a cast per call (ORT CPU); ort-cuda
    stores them fp32 (a GPU decode step would move ~3 GB for the cast); the other targets never see BF16."""
    from dsv4.export.targets import TARGETS

    assert [t.name for t in TARGETS.values() if t.bf16_initializers] == ["ort-cpu"]


def test_keep_bf16_inserts_an_exact_cast():
    """A BF16-stored initializer read as float32 becomes BF16 + Cast: the same values in ORT, half the bytes."""
    w = ir.Value(name="w", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 3]))
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([3, 2]))
    mm = ir.node("MatMul", [w, x])
    mm.outputs[0].name, mm.outputs[0].dtype = "y", ir.DataType.FLOAT
    g = ir.Graph([x], mm.outputs, nodes=[mm], initializers=[w], opset_imports={"": 23})
    assert stream.keep_bf16({"g": ir.Model(g, ir_version=10)}, _Src()) == 1
    assert w.dtype == ir.DataType.BFLOAT16 and [n.op_type for n in g] == ["Cast", "MatMul"]
    vals = torch.tensor([[1.5, -2.0, 0.1], [3.0, 0.25, -7.0]]).to(torch.bfloat16)
    w.const_value = ir.tensor(vals.view(torch.int16).numpy().view(np.uint16).view(ir.DataType.BFLOAT16.numpy()),
                              dtype=ir.DataType.BFLOAT16)
    sess = ort.InferenceSession(ir.serde.serialize_model(ir.Model(g, ir_version=10)).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    xv = np.eye(3, 2, dtype=np.float32)
    np.testing.assert_array_equal(sess.run(None, {"x": xv})[0], vals.float().numpy() @ xv)


def test_progress_reports_tensors_bytes_rate_and_eta():
    seen = []
    p = stream.Progress(2, 2000, seen.append, every=0)
    p.advance(1000, tensor=True)
    assert seen and seen[-1].startswith("1/2 tensors") and "MB/s" in seen[-1] and "ETA" in seen[-1]


@pytest.mark.parametrize("name, reps, first_of", [
    ("flash", [0, 2, 3, 4], [0, 0, 1, 2, 3, 2, 3]),
    ("pro", [0, 2, 3, 4], [0, 0, 1, 2, 3, 2, 3]),
    ("tiny", [0, 1, 2, 3], [0, 1, 2, 3]),
])
def test_layer_kinds(name, reps, first_of):
    """Each layer maps to the first layer of its kind (ratio x routing): four kinds in Flash and Pro."""
    r, of = layers.kinds(preset(name))
    assert r == reps and of[: len(first_of)] == first_of


@pytest.mark.slow  # two traces of a 4-layer model and two ORT sessions (~5-10 min on 2 shared cores)
def test_per_kind_trace_matches_the_eager_model(tmp_path):
    """A 6-layer tiny variant (layers 4, 5 repeat the kinds of 2, 3) exported by tracing its four kinds once: its
    graphs have every layer's inputs, outputs and weights, and prefill + one decode step equal the eager model."""
    from dsv4.export.export import export_artifact
    from dsv4.models import DeepseekV4, init_random_
    from dsv4.runtimes.ort import Generator

    args = preset("tiny", n_layers=6, compress_ratios=(0, 4, 128, 4, 128, 4, 0), quant_sim=False)
    model = init_random_(DeepseekV4(args), seed=0)
    res = export_artifact(tmp_path / "art", model=model, progress=False)
    assert res.seconds["trace step"] > 0 and "trace prefill" not in res.seconds  # one trace, two graphs
    ids = np.random.default_rng(0).integers(0, args.vocab_size, (1, 150)).astype(np.int64)
    with torch.no_grad():
        ref, state = model(torch.from_numpy(ids))
        nxt = ref[:, -1:].argmax(-1)
        ref2, _ = model(nxt, state)
    g = Generator(res.path, verify=False)
    assert any(k.startswith("5.") for k in g.names)
    np.testing.assert_allclose(np.asarray(g.prefill(ids)), ref[:, -1:].numpy(), rtol=0, atol=1e-4)  # last position
    np.testing.assert_allclose(np.asarray(g.step(nxt.numpy())), ref2.numpy(), rtol=0, atol=1e-4)
