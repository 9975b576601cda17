"""runtimes/ort: sessions and the Generator (prefill / step / generate, its errors, packed weights at run time)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dsv4.runtimes.base import CapacityError, sample
from dsv4.runtimes.ort import Generator, load_sessions


@pytest.fixture(scope="module")
def gen_f32(tiny_artifact_f32):
    return Generator(tiny_artifact_f32)


def test_generate_matches_eager_greedy_batch2(gen_f32, tiny_eager_f32):
    """Batch 2, greedy: the tokens the artifact yields one by one equal the eager model's greedy tokens."""
    ids = torch.randint(0, 512, (2, 23), generator=torch.Generator().manual_seed(3))
    got = np.stack(list(gen_f32.generate(ids.numpy(), 12, ignore_eos=True)), 1)
    want, st = [], None
    with torch.no_grad():
        logits, st = tiny_eager_f32(ids)
        for _ in range(12):
            tok = logits[:, -1:].argmax(-1)
            want.append(tok)
            logits, st = tiny_eager_f32(tok, st)
    np.testing.assert_array_equal(got, torch.cat(want, 1).numpy())
    assert gen_f32.position.tolist() == [23 + 11, 23 + 11]


def test_errors_name_the_problem(gen_f32):
    with pytest.raises(ValueError, match="call prefill first"):
        _fresh(gen_f32).step([1])
    with pytest.raises(ValueError, match=r"token id 512 at \[0, 2\] is outside the vocabulary \[0, 512\)"):
        gen_f32.prefill([[1, 2, 512]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gen_f32.prefill([[-1, 2]])
    gen_f32.prefill([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match="batch 3 does not match the sequences' batch 2"):
        gen_f32.step([1, 2, 3])
    with pytest.raises(ValueError, match="one token per sequence"):
        gen_f32.step([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="integers"):
        gen_f32.prefill([[1.5, 2.0]])
    with pytest.raises(CapacityError, match="exceed max_seq_len=1024"):
        gen_f32.prefill(np.zeros((1, 1025), dtype=np.int64))


def _fresh(gen):
    """A Generator sharing `gen`'s sessions but holding no sequences."""
    g = gen.__class__.__new__(gen.__class__)
    g.__dict__.update(gen.__dict__)
    g.state = None
    return g


def test_generate_past_max_seq_len_says_how_far_it_got(gen_f32):
    g = _fresh(gen_f32)
    ids = np.ones((1, 1020), dtype=np.int64)
    toks = []
    with pytest.raises(CapacityError, match=r"stopped after 5 of 10 new tokens.*1024 positions"):
        for t in g.generate(ids, 10, ignore_eos=True):
            toks.append(t)
    assert len(toks) == 5  # 1 from the prefill logits + 4 decode steps filling positions 1020..1023
    with pytest.raises(CapacityError, match="max_seq_len=1024 reached"):
        g.step(toks[-1])


def test_sampling_is_seeded_and_top_p_narrows_to_greedy():
    logits = np.random.default_rng(0).standard_normal((3, 50))
    a = sample(logits, 1.0, 1.0, np.random.default_rng(7))
    b = sample(logits, 1.0, 1.0, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(sample(logits, 1.0, 1e-9, np.random.default_rng(1)), logits.argmax(-1))
    np.testing.assert_array_equal(sample(logits, 0.0, 1.0, np.random.default_rng(1)), logits.argmax(-1))


def test_packed_weights_stay_packed_in_the_session(tiny_artifact, tmp_path):
    """With the artifact's options ORT keeps the uint8 weights and the in-graph dequant (ConstantFolding off)."""
    from dsv4.export.artifact import load_manifest
    from dsv4.runtimes.ort.session import session_options

    man = load_manifest(tiny_artifact, verify=False)
    so, disabled = session_options(man)
    assert disabled == ["ConstantFolding"]
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.data")
    ort.InferenceSession(str(tiny_artifact / "decode.onnx"), so, providers=["CPUExecutionProvider"],
                         disabled_optimizers=disabled)
    m = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    inits = {t.name: t.data_type for t in m.graph.initializer}
    assert inits["layers.0.ffn.experts.w1.weight"] == onnx.TensorProto.UINT8
    assert inits["layers.0.attn.wq_a.weight"] == onnx.TensorProto.UINT8
    readers = {n.op_type for n in m.graph.node if "layers.0.ffn.experts.w1.weight" in n.input}
    assert "Cast" in readers <= {"Cast", "Shape"}  # the in-graph dequant (int32 -> table lookup) runs every call


def test_generate_prompt_text_through_the_shipped_tokenizer(tiny_artifact_f32, capsys):
    """The checkpoint's tokenizer.json travels into the artifact (hashed in the manifest); ``--prompt TEXT`` encodes
    with it and prints the decoded text: the same tokens as ``--prompt-ids`` with the ids of those words."""
    from dsv4.export.artifact import load_manifest
    from dsv4.tools.cli import main

    man = load_manifest(tiny_artifact_f32)
    assert man["tokenizer"] == "tokenizer.json" and "tokenizer.json" in man["files"]
    assert main(["generate", str(tiny_artifact_f32), "--prompt-ids", "5,17,300", "--max-new-tokens", "4", "--ids"]) == 0
    want = " ".join(f"w{i}" for i in capsys.readouterr().out.split())
    assert main(["generate", str(tiny_artifact_f32), "--prompt", "w5 w17  w300", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == want


def test_prompt_text_needs_a_tokenizer(tmp_path):
    from types import SimpleNamespace

    from dsv4.tools.cmd_generate import _tokenizer

    with pytest.raises(ValueError, match="no tokenizer.json"):
        _tokenizer(SimpleNamespace(manifest={"tokenizer": None}, art=tmp_path))


def test_missing_provider_is_a_clear_error(tiny_artifact):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(ValueError, match="CUDAExecutionProvider not available"):
        load_sessions(tiny_artifact, providers=["CUDAExecutionProvider"], verify=False)


def test_generate_and_inspect_commands(tiny_artifact_f32, capsys):
    """``dsv4 generate --ids`` prints one line of ids per sequence, then the rates on stderr; ``dsv4 inspect --json``
    the op histograms."""
    import json

    from dsv4.tools.cli import main

    assert main(["generate", str(tiny_artifact_f32), "--prompt-ids", "1,2,3;4,5,6,7", "--max-new-tokens", "3", "--ids",
                 "--ignore-eos"]) == 0
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert len(lines) == 2 and all(len(line.split()) == 3 for line in lines)
    assert "prefill: 7 tokens" in out.err and "decode: 4 tokens" in out.err and "tokens/s" in out.err
    assert main(["generate", str(tiny_artifact_f32), "--prompt", "   "]) == 2
    assert "no ids" in capsys.readouterr().err
    assert main(["generate", str(tiny_artifact_f32), "--prompt-ids", "1,2,999", "--max-new-tokens", "1"]) == 2
    assert "outside the vocabulary" in capsys.readouterr().err
    assert main(["inspect", str(tiny_artifact_f32), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["graphs"]["prefill"]["dsv4"]["SparseAttn"] == 4 and info["weights"] == "float32"
