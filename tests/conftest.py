"""Shared fixtures: the tiny preset and models built from it (session-scoped, built once)."""

from __future__ import annotations

import os

import pytest
import torch

from dsv4.models import DeepseekV4, init_random_, preset

# The test models are tiny: one intra-op thread is faster than two, and it cannot fight ONNX Runtime's own
# thread pool (or another process) for the 2 cores — with 2 threads the token-by-token loops ran 30x slower
# whenever the other core was busy.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_args():
    return preset("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_args):
    """tiny, fp32, quantisation simulation on, seed 0."""
    return init_random_(DeepseekV4(tiny_args), seed=0).eval()


@pytest.fixture(scope="session")
def tiny_model_f64():
    """tiny in fp64 with the quantisation simulation on: rounding decisions no longer depend on 1-ulp noise."""
    return init_random_(DeepseekV4(preset("tiny"), dtype=torch.float64), seed=0).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A synthetic tiny checkpoint in the official format (seed 0, 256 kB shards so there are several); read-only."""
    from dsv4.models.checkpoint_write import write_synthetic

    ck = write_synthetic(preset("tiny"), tmp_path_factory.mktemp("ckpt") / "tiny", seed=0, shard_size="256KB",
                         progress=False)
    write_word_tokenizer(ck / "tokenizer.json", preset("tiny").vocab_size)  # shipped like the official one
    # where `dsv4 parity ART` looks for the source checkpoint by its identity (artifacts record no path), as a user
    # whose checkpoints are not beside the artifacts sets it (runtimes/eager.py find_checkpoint)
    os.environ["DSV4_CHECKPOINTS"] = os.pathsep.join(
        p for p in (os.environ.get("DSV4_CHECKPOINTS"), str(ck.parent)) if p)
    return ck


def write_word_tokenizer(path, vocab_size: int) -> None:
    """A tokenizer.json (HF `tokenizers` format) whose words w0..w{V-1} are the ids 0..V-1, split on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


# ---- exported artifacts (export/, runtimes/): one export is 30-90 s on 2 cores, so they are shared ---------
@pytest.fixture(scope="session")
def tiny_artifact(tiny_checkpoint, tmp_path_factory):
    """tiny exported from the synthetic checkpoint as shipped: FP8/MXFP4 packed, quant_sim on, fp32, ort-cpu;
    max_seq_len 1024 (the preset's, which its config.json carries as max_position_embeddings)."""
    from dsv4.export.export import export_artifact

    return export_artifact(tmp_path_factory.mktemp("art") / "tiny", checkpoint=tiny_checkpoint, max_seq_len=1024,
                           progress=False).path


@pytest.fixture(scope="session")
def tiny_artifact_f32(tiny_checkpoint, tmp_path_factory):
    """tiny from the same checkpoint with --weights float32, the quantisation simulation off, --all-logits (the
    strict parity then judges every prefill position; the default artifact returns the last one) and --mtp (the
    MTP and verify graphs of speculative decoding, tests/test_mtp.py)."""
    from dsv4.export.export import export_artifact

    return export_artifact(tmp_path_factory.mktemp("art") / "tiny_f32", checkpoint=tiny_checkpoint, max_seq_len=1024,
                           weights="float32", quant_sim=False, all_logits=True, mtp=True, progress=False).path


@pytest.fixture(scope="session")
def tiny_artifact_f64(tiny_model_f64, tmp_path_factory):
    """tiny_model_f64 (fp64, quant_sim on) exported from memory with float64 weights: the exactness artifact."""
    from dsv4.export.export import export_artifact

    return export_artifact(tmp_path_factory.mktemp("art") / "tiny_f64", model=tiny_model_f64, weights="float64",
                           progress=False).path


@pytest.fixture(scope="session")
def tiny_eager_packed(tiny_checkpoint):
    """The eager model tiny_artifact was exported from (packed weights, quant_sim on)."""
    from dsv4.models.checkpoint import load_model

    return load_model(tiny_checkpoint, keep_quantized=True, max_seq_len=1024, progress=False)


@pytest.fixture(scope="session")
def tiny_eager_f32(tiny_checkpoint):
    """The eager model of tiny_artifact_f32 (weights dequantised at load, quant_sim off)."""
    from dsv4.models.checkpoint import load_model

    return load_model(tiny_checkpoint, keep_quantized=False, quant_sim=False, max_seq_len=1024, progress=False)


# ---- TVM (runtimes/tvm): one export for the TVM targets and its llvm build, shared by tests/test_tvm*.py ---------
@pytest.fixture(scope="session")
def tiny_artifact_tvm(tiny_checkpoint, tmp_path_factory):
    """tiny_artifact_f32's twin exported for tvm-llvm with the target's pass pipeline (fused MoE, lowered dsv4 ops
    kept as nodes): float32 weights, quant_sim off, max_seq_len 1024. Its eager model is tiny_eager_f32."""
    from dsv4.export.export import export_artifact
    from dsv4.passes.pipeline import run

    return export_artifact(tmp_path_factory.mktemp("art") / "tiny_tvm", checkpoint=tiny_checkpoint, max_seq_len=1024,
                           weights="float32", quant_sim=False, target="tvm-llvm", progress=False,
                           transform=lambda model, graph, target: run(model, target.name)).path


@pytest.fixture(scope="session")
def tiny_tvm_llvm(tiny_artifact_tvm, tmp_path_factory):
    """``dsv4 compile tiny_artifact_tvm --target tvm-llvm``: the compiled directory (about a minute on 2 cores)."""
    from dsv4.runtimes.tvm import compile_artifact

    out = tmp_path_factory.mktemp("tvm") / "tiny_llvm"
    compile_artifact(tiny_artifact_tvm, out, target="tvm-llvm", progress=False)
    return out


def fuse_artifact(src, dst, target: str = "ort-cpu", experts: str | None = None) -> dict:
    """A copy of a raw artifact with the target's pipeline applied to both graphs (what export with passes writes,
    except that the derived weights are stored inside the .onnx files; raw graphs do not depend on the target); the
    manifest follows the new files and names the target and the expert storage. experts: ``--experts`` stamped on
    the graphs as the export does (None: unstamped, the lowering's own form, int8 on the ORT targets)."""
    import shutil

    import onnx_ir as ir

    from dsv4.export import artifact, custom_ops
    from dsv4.export.experts import EXPERTS_KEY
    from dsv4.export.signature import GRAPHS
    from dsv4.export.targets import get_target
    from dsv4.passes import pipeline

    shutil.copytree(src, dst)
    man = artifact.load_manifest(dst, verify=False)
    counts = {}
    for g in GRAPHS:
        path = dst / f"{g}.onnx"
        model = ir.load(path)
        if experts is not None:
            model.meta[EXPERTS_KEY] = experts
        counts[g] = pipeline.run(model, target)
        ir.save(model, path)
        man["graphs"][g] |= {"nodes": sum(1 for _ in model.graph), "pass_counts": counts[g],
                             "dsv4_nodes": dict(custom_ops.dsv4_nodes(model))}
        man["files"][path.name] = {"bytes": path.stat().st_size, "sha256": artifact.sha256(path)}
    man["target"] = target
    modes = get_target(target).experts if man.get("weights") == "packed" else ()
    man["experts"] = experts or ("int8" if modes else None)  # unstamped graphs: the lowering's int8
    artifact.write_manifest(dst, man)
    return counts


@pytest.fixture(scope="session")
def tiny_artifact_default(tiny_artifact, tmp_path_factory):
    """tiny_artifact with the ort-cpu pipeline applied: what ``dsv4 export`` writes by default (packed FP8/MXFP4,
    quant_sim on, fp32, passes on; the derived weights inside the graph files) except the expert storage: unstamped
    graphs get the int8 re-encoding (``--experts int8``; the manifest says so). The packed default's lowering on tiny
    is tests/test_lower_cuda.py's (the same NarrowMoE(packed) + expert Loop on ort-cuda)."""
    dst = tmp_path_factory.mktemp("fused") / "packed"
    fuse_artifact(tiny_artifact, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_packed_reference(tiny_artifact, tiny_eager_packed):
    """The eager side of parity for every tiny packed quant_sim-on fp32 artifact (raw, default, mutants): eager fp32,
    its fp64 twin and two noise twins on the 300-token prompt + 64 steps, layer streams captured (~40 s, once)."""
    from dsv4.export.artifact import load_manifest
    from dsv4.runtimes.parity import eager_reference

    return eager_reference(tiny_eager_packed, load_manifest(tiny_artifact, verify=False), steps=64, prompt_len=300,
                           per_layer=True)


# ---- ort-cuda (passes/lint.py, tests/test_lint.py, tests/test_lower_cuda.py): the CUDA pipeline on the raw exports ----
def cuda_artifact(src, dst, experts: str | None = "packed") -> dict:
    """fuse_artifact with the ort-cuda pipeline (what an ort-cuda export writes: --experts packed by default)."""
    return fuse_artifact(src, dst, "ort-cuda", experts)


@pytest.fixture(scope="session")
def tiny_artifact_cuda(tiny_artifact, tmp_path_factory):
    """tiny_artifact (packed FP8/MXFP4, quant_sim on) through the ort-cuda pipeline, as `dsv4 export --target
    ort-cuda` writes it: the MXFP4 expert stacks stay packed (--experts packed, the default)."""
    dst = tmp_path_factory.mktemp("cuda") / "packed"
    cuda_artifact(tiny_artifact, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_artifact_f32_cuda(tiny_artifact_f32, tmp_path_factory):
    """tiny_artifact_f32 (float32 weights, quant_sim off) through the ort-cuda pipeline: com.microsoft.MoE."""
    dst = tmp_path_factory.mktemp("cuda") / "f32"
    cuda_artifact(tiny_artifact_f32, dst, experts=None)  # float weights: --experts does not arise
    return dst


# ---- ascend (export/static.py, passes/ascend.py) ------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_artifact_ascend(tiny_checkpoint, tmp_path_factory):
    """tiny for the ascend target as its fp32 twin without the simulation (strict parity against tiny_eager_f32):
    static batch 1, one prefill bucket of 256 tokens, decode state for 1024."""
    from dsv4.export.export import export_artifact
    from dsv4.passes.pipeline import run

    return export_artifact(tmp_path_factory.mktemp("art") / "tiny_ascend", checkpoint=tiny_checkpoint,
                           target="ascend", weights="float32", quant_sim=False, max_seq_len=1024,
                           prefill_lengths=(256,), transform=lambda m, g, t: run(m, t.name), progress=False).path
