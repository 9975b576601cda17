"""Expert-parallel artifacts (issue [11]): rank templates cut per rank, Gloo ranks equal to the single-rank artifact,
a killed or stuck rank ends every rank with a clear error."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from dsv4.export.ranks import SENTINELS, check_ranks, shard

STRICT_FP32 = 1e-4  # runtimes/verdict.py TOLERANCES[("float32", False)].logits_abs: the strict fp32 bound
ALIGN = 64  # export/stream.py: every tensor of a weights file starts on a 64-byte boundary


@pytest.fixture(scope="module")
def tiny_template(tiny_checkpoint, tmp_path_factory):
    """The rank template of tiny_artifact's export (same checkpoint, max_seq_len 1024, ort-cpu, packed)."""
    from dsv4.export.export import export_artifact
    from dsv4.passes.shard_experts import rank_transform

    return export_artifact(tmp_path_factory.mktemp("ranks") / "template", checkpoint=tiny_checkpoint,
                           max_seq_len=1024, transform=rank_transform, progress=False).path


@pytest.fixture(scope="module")
def tiny_single(tiny_checkpoint, tmp_path_factory):
    """The single-rank artifact `dsv4 export` makes from the same checkpoint: the ort-cpu pass pipeline."""
    from dsv4.export.export import export_artifact
    from dsv4.passes.pipeline import run

    return export_artifact(tmp_path_factory.mktemp("ranks") / "single", checkpoint=tiny_checkpoint, max_seq_len=1024,
                           transform=lambda m, g, t: run(m, t.name), progress=False).path


@pytest.fixture(scope="module")
def tiny_ranks(tiny_template, tmp_path_factory):
    """{N: the ranks artifact of N ranks} for N = 1, 2, 4."""
    root = tmp_path_factory.mktemp("ranks")
    return {n: shard(tiny_template, n, root / f"r{n}", progress=False) and root / f"r{n}" for n in (1, 2, 4)}


def _sharded_bytes(template) -> tuple[int, int]:
    """(bytes of the expert stacks, bytes of everything else) of a template's weights."""
    seen, experts, rest = set(), 0, 0
    for f in ("prefill.onnx", "decode.onnx"):
        m = onnx.load(str(template / f), load_external_data=False)
        sharded = set(json.loads(next(p.value for p in m.metadata_props if p.key == "dsv4.ranks.sharded")))
        for t in m.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL or t.name in seen:
                continue
            seen.add(t.name)
            n = int(next(e.value for e in t.external_data if e.key == "length"))
            if t.name in sharded:
                experts += n
            else:
                rest += n
    return experts, rest


@pytest.mark.parametrize("n", [2, 4])
def test_weights_per_rank(tiny_template, tiny_ranks, n):
    """Each rank's weights file = 1/N of the experts' bytes + the whole replicated part (+ alignment padding)."""
    experts, rest = _sharded_bytes(tiny_template)
    man = json.loads((tiny_ranks[n] / "manifest.json").read_text())
    assert man["ranks"] == n and man["experts"]["per_rank"] == 8 // n
    tensors = sum(1 for _ in onnx.load(str(tiny_template / "decode.onnx"), load_external_data=False).graph.initializer)
    for r in man["rank_dirs"]:
        assert r["expert_bytes"] == experts // n
        assert r["replicated_bytes"] == rest
        size = (tiny_ranks[n] / r["dir"] / "weights.data").stat().st_size
        assert experts // n + rest <= size <= experts // n + rest + 2 * tensors * ALIGN, (size, experts, rest)
    assert experts > 0.2 * (experts + rest)  # tiny's experts are a real share of its weights


def test_rank_graphs(tiny_ranks, tiny_args):
    """Rank graphs: one all-reduce per MoE layer, the rank's constants written, expert stacks cut to E/N rows."""
    man = json.loads((tiny_ranks[4] / "manifest.json").read_text())
    assert man["collective"]["per_step"] == tiny_args.n_layers
    assert man["collective"]["sum"] == "ordered"  # the default: per-slot terms, top_k x dim fp32 per layer
    assert man["collective"]["bytes_per_token"] == tiny_args.n_layers * tiny_args.n_activated_experts * tiny_args.dim * 4
    for r in man["rank_dirs"]:
        for g in ("prefill", "decode"):
            m = onnx.load(str(tiny_ranks[4] / r["dir"] / f"{g}.onnx"), load_external_data=False)
            ops = [f"{n.domain}.{n.op_type}" for n in m.graph.node]
            assert ops.count("ai.onnx.contrib.Dsv4AllReduce") == tiny_args.n_layers
            consts = [numpy_helper.to_array(a.t) for n in m.graph.node if n.op_type == "Constant"
                      for a in n.attribute if a.name == "value"]
            assert not any(c.size == 1 and c.dtype == np.int64 and int(c.reshape(-1)[0]) in SENTINELS.values()
                           for c in consts)
            assert int(r["experts"][0]) in [int(c.reshape(-1)[0]) for c in consts if c.dtype == np.int64 and c.size == 1]
            stacks = [t for t in m.graph.initializer if ".experts." in t.name]
            assert stacks and all(t.dims[0] == 2 for t in stacks)


def test_bad_input(tiny_artifact, tiny_ranks, monkeypatch):
    """--ranks that does not divide E, a non-template, a ranks artifact opened without its ranks: clear errors."""
    from dsv4.runtimes.ort import Generator
    from dsv4.runtimes.ort.launch import launch

    for bad in (0, -2, "2", 2.0, True):
        with pytest.raises(ValueError, match="--ranks: expected a positive integer"):
            check_ranks(bad)
    with pytest.raises(ValueError, match="--ranks: 3 does not divide the model's 8 routed experts"):
        check_ranks(3, 8)
    with pytest.raises(ValueError, match="not a rank template"):
        shard(tiny_artifact, 2, tiny_artifact.parent / "never")
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        Generator(tiny_ranks[2])
    with pytest.raises(ValueError, match="exported for 2 ranks, got 4"):
        launch(tiny_ranks[2], 4, None)
    with pytest.raises(ValueError, match="not an expert-parallel artifact"):
        launch(tiny_artifact, 2, None)


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2, 4])
def test_ranks_equal_single_tiny(tiny_single, tiny_ranks, n):
    """tiny on N Gloo ranks: 300-token prefill + 64 greedy steps, logits and tokens equal the single-rank
    artifact's. Bit-identical: tiny routes top-2, and a sum of two terms (plus exact zeros) has one order."""
    from dsv4.runtimes.ort import Generator
    from dsv4.runtimes.ort.launch import greedy, launch

    ids = np.random.default_rng(0).integers(0, 512, size=(1, 300))
    logits, tokens, _ = launch(tiny_ranks[n], n, greedy, (ids, 64))
    ref_logits, ref_tokens, _ = greedy(Generator(tiny_single, threads=1), 0, ids, 64)
    assert logits.shape == ref_logits.shape and logits.shape[1] >= 65  # the prefill's logits + 64 steps
    assert np.array_equal(tokens, ref_tokens)
    assert float(np.abs(logits - ref_logits).max()) <= STRICT_FP32
    assert np.array_equal(logits, ref_logits)


def _die_at(gen, rank: int, ids, step: int, how: int):
    """A launch() function: rank 1 sends itself `how` (SIGKILL, SIGSTOP) at decode step `step`."""
    gen.prefill(ids)
    tok = np.zeros((1, 1), np.int64)
    for k in range(64):
        if rank == 1 and k == step:
            os.kill(os.getpid(), how)
        tok = gen.step(tok)[:, -1].argmax(-1)[:, None]
    return "finished"


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stuck"])
def test_one_rank_dies(tiny_ranks, monkeypatch, how):
    """A rank killed (or stopped) mid-generation: every rank ends, rank 0 with a CollectiveError, within the timeout."""
    from dsv4.runtimes.ort.launch import RanksFailed, launch

    monkeypatch.setenv("DSV4_COLLECTIVE_TIMEOUT", "10")
    ids = np.arange(20, dtype=np.int64)[None]
    t = time.monotonic()
    with pytest.raises(RanksFailed) as e:
        launch(tiny_ranks[2], 2, _die_at, (ids, 3, how), grace=15, deadline=240)
    took = time.monotonic() - t
    msg = str(e.value)
    assert "rank 0: CollectiveError: rank 0 of 2: an all-reduce failed" in msg
    if how == signal.SIGKILL:
        assert "rank 1: killed by SIGKILL" in msg
    assert took < 120, took


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    """small as shipped (packed, the quantisation simulations on): (single-rank artifact, {2: ranks artifact,
    4: ranks artifact}), from one synthetic checkpoint (seed 0)."""
    from dsv4.export.export import export_artifact
    from dsv4.passes.pipeline import run
    from dsv4.passes.shard_experts import rank_transform

    root = tmp_path_factory.mktemp("small")
    single = export_artifact(root / "single", preset="small", progress=False,
                             transform=lambda m, g, t: run(m, t.name)).path
    template = export_artifact(root / "template", preset="small", progress=False, transform=rank_transform).path
    return single, {n: shard(template, n, root / f"r{n}", progress=False) and root / f"r{n}" for n in (2, 4)}


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4])
def test_ranks_equal_single_small(small_pair, n):
    """small (top-4 of 16 experts, simulations on) on N Gloo ranks, 300-token prefill + 64 greedy steps: logits and
    tokens bit-identical to the single-rank artifact (the ordered sum adds each token's terms in its order)."""
    from dsv4.runtimes.ort import Generator
    from dsv4.runtimes.ort.launch import greedy, launch

    single, ranks = small_pair
    ids = np.random.default_rng(0).integers(0, 8192, size=(1, 300))
    logits, tokens, _ = launch(ranks[n], n, greedy, (ids, 64))
    ref_logits, ref_tokens, _ = greedy(Generator(single, threads=1), 0, ids, 64)
    assert np.array_equal(tokens, ref_tokens)
    assert float(np.abs(logits - ref_logits).max()) <= STRICT_FP32
    assert np.array_equal(logits, ref_logits)


@pytest.mark.slow
def test_partial_sum_tiny(tiny_checkpoint, tiny_single, tmp_path):
    """--rank-sum partial (per-rank partial sums all-reduced, dim fp32 per layer): with tiny's top-2 a token's two terms
    have one sum whatever the grouping, so 2 ranks are still bit-identical."""
    import functools

    from dsv4.export.export import export_artifact
    from dsv4.passes.shard_experts import rank_transform
    from dsv4.runtimes.ort import Generator
    from dsv4.runtimes.ort.launch import greedy, launch

    template = export_artifact(tmp_path / "template", checkpoint=tiny_checkpoint, max_seq_len=1024, progress=False,
                               transform=functools.partial(rank_transform, rank_sum="partial")).path
    man = shard(template, 2, tmp_path / "r2", progress=False)
    assert man["collective"]["sum"] == "partial" and man["collective"]["bytes_per_token"] == 4 * 128 * 4
    ids = np.random.default_rng(1).integers(0, 512, size=(1, 200))
    logits, tokens, _ = launch(tmp_path / "r2", 2, greedy, (ids, 64))
    ref_logits, ref_tokens, _ = greedy(Generator(tiny_single, threads=1), 0, ids, 64)
    assert np.array_equal(tokens, ref_tokens) and np.array_equal(logits, ref_logits)


@pytest.mark.slow
def test_cli_generate_and_parity(tiny_single, tiny_ranks, capfd):
    """dsv4 generate ART --ranks 2 prints the single-rank artifact's tokens; dsv4 parity ART passes."""
    from dsv4.tools.cli import main

    args = ["--prompt-ids", "1,2,3,4,5", "--max-new-tokens", "12", "--ids"]
    assert main(["generate", str(tiny_single), *args]) == 0
    single = capfd.readouterr().out.split()
    assert main(["generate", str(tiny_ranks[2]), "--ranks", "2", *args]) == 0
    assert capfd.readouterr().out.split() == single and len(single) == 12
    assert main(["generate", str(tiny_ranks[2]), "--ranks", "4", *args]) == 2
    assert "holds 2 ranks, got --ranks 4" in capfd.readouterr().err
    assert main(["parity", str(tiny_ranks[2]), "--steps", "8", "--prompt-len", "100"]) == 0


def test_cli_export_bad_ranks(capfd):
    """dsv4 export --ranks that does not divide the experts: refused before any work, naming --ranks."""
    from dsv4.tools.cli import main

    assert main(["export", "--preset", "tiny", "--ranks", "3", "--out", "/nonexistent/never"]) == 2
    assert "--ranks: 3 does not divide the model's 8 routed experts" in capfd.readouterr().err


@pytest.mark.parametrize("n", [1, 2, 4])
def test_ranks_disk_bytes_bound_the_rank_artifacts_and_a_short_disk_is_refused(tiny_template, tiny_ranks, tmp_path,
                                                                               monkeypatch, n):
    """shard() asks for its bytes on disk before writing: the rank weights files + graphs it then writes, up to
    each tensor's alignment (ALIGN per tensor per rank); a filesystem without that much free refuses with nothing
    written."""
    from collections import namedtuple

    from dsv4.export import artifact
    from dsv4.export.ranks import ranks_disk_bytes
    from dsv4.models import files

    tman = artifact.load_manifest(tiny_template, verify=False)
    need = ranks_disk_bytes(tiny_template, tman, n)
    man = json.loads((tiny_ranks[n] / "manifest.json").read_text())
    graphs = ("prefill.onnx", "decode.onnx")
    weights = sum((tiny_ranks[n] / r["dir"] / "weights.data").stat().st_size for r in man["rank_dirs"])
    rank_graphs = sum((tiny_ranks[n] / r["dir"] / f).stat().st_size for r in man["rank_dirs"] for f in graphs)
    template_graphs = n * sum((tiny_template / f).stat().st_size for f in graphs)
    tensors = len({t.name for f in graphs for t in onnx.load(str(tiny_template / f), load_external_data=False)
                   .graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL})
    # weights: exact up to each tensor's alignment; graphs: the template's size at most (value_info is dropped)
    assert 0 <= need - template_graphs - weights <= n * ALIGN * tensors
    assert 0.5 * template_graphs <= rank_graphs <= template_graphs
    free = files.RESERVE + need - 1
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: namedtuple("U", "total used free")(free, 0, free))
    with pytest.raises(files.DiskSpaceError, match=rf"--out {tmp_path / 'r'} \({n} ranks\): needs"):
        shard(tiny_template, n, tmp_path / "r", progress=False)
    assert list(tmp_path.iterdir()) == []
    if n == 1:  # --no-space-check reaches shard: the same cut is written
        shard(tiny_template, n, tmp_path / "r", progress=False, space_check=False)
        assert (tmp_path / "r" / "rank0" / "weights.data").stat().st_size == weights
