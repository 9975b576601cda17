"""Expert-parallel artifacts (issue [11], docs/scale.md): one artifact per rank, described by one ranks manifest.

``export_ranks(out, ranks, transform=passes.shard_experts.rank_transform, ...)`` exports the rank *template* once
(the pass pipeline with ShardExperts: every MoE layer masks its routing to a rank's experts and all-reduces its
output before the shared expert is added) and ``shard`` cuts it into ``ranks`` artifacts:

    ART/manifest.json       format "dsv4-ranks": ranks, what each holds, the collective each step needs
    ART/rank{r}/            a complete dsv4 artifact (manifest, prefill.onnx, decode.onnx, weights.data, config.json)

Rank r holds experts r·E/N .. (r+1)·E/N − 1 of every MoE layer (its rows of each stacked expert tensor, byte ranges
of the template's weights file copied by the kernel) and everything else whole (attention, compressors, indexer,
router, shared expert, embeddings, head, hyper-connections). Its graphs are the template's with the rank's
constants written in (passes/shard_experts.SENTINELS) and the expert stacks' first dim cut to E/N.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from dsv4.models.files import allocated_bytes, check_destination, check_space

from . import artifact
from .stream import ALIGN, WeightsFile

FORMAT = "dsv4-ranks"
FORMAT_VERSION = 1
RANK_DIR = "rank{}"
# kept in sync with passes/shard_experts.py (export may not import passes: models <- export <- passes)
COLLECTIVE = {"op": "ai.onnx.contrib.Dsv4AllReduce", "reduce": "sum", "dtype": "float32",
              "where": "after the routed experts of every MoE layer, before the shared expert is added",
              "kernel": "onnxruntime-extensions PyOp over torch.distributed (runtimes/ort/distributed.py)",
              "backends": {"cpu": "gloo", "cuda": "nccl"}}
SHARDED_KEY = "dsv4.ranks.sharded"
SENTINELS = {"offset": -7_301_000_000_001, "start": -7_301_000_000_002, "end": -7_301_000_000_003,
             "count": -7_301_000_000_004}


def check_ranks(ranks, experts: int | None = None) -> int:
    """ranks as a positive int dividing the routed experts (when known); ValueError naming --ranks otherwise."""
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"--ranks: expected a positive integer, got {ranks!r}")
    if experts is not None and experts % ranks:
        raise ValueError(f"--ranks: {ranks} does not divide the model's {experts} routed experts (n_routed_experts); "
                         "every rank holds E/N experts")
    return ranks


def export_ranks(out: str | Path, ranks: int, *, transform, overwrite: bool = False, progress: bool | None = None,
                 space_check: bool = True, **export_kwargs) -> dict:
    """Export the rank template with `transform` (passes.shard_experts.rank_transform) and shard it into `ranks`
    artifacts under `out`; returns the ranks manifest. export_kwargs go to export_artifact (checkpoint / preset /
    model, target, max_seq_len, ...). space_check: before the template's weights, room for at least twice them
    (the rank artifacts hold every expert once and the rest once per rank: never less than the template); before
    cutting, room for exactly what the ranks take (ranks_disk_bytes)."""
    from .export import export_artifact

    check_ranks(ranks)
    if export_kwargs.get("preset"):
        from dsv4.models.config import preset

        check_ranks(ranks, preset(export_kwargs["preset"]).n_routed_experts)
    if export_kwargs.get("model") is not None:
        check_ranks(ranks, export_kwargs["model"].args.n_routed_experts)
    out = Path(out)
    check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    artifact.clean_stale(out.parent)
    # named and owned like artifact.writing's temporaries: a SIGKILLed export's template goes at the next export
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.template.tmp-", dir=out.parent) as tmp:
        artifact.mark_owner(Path(tmp))
        def room(need: int) -> None:
            check_space(out.parent, 2 * need, f"--out {out} ({ranks} ranks: the template, then the rank artifacts, "
                        "at least as large)")

        res = export_artifact(Path(tmp) / "template", transform=transform, progress=progress,
                              space_check=room if space_check else False, **export_kwargs)
        return shard(res.path, ranks, out, overwrite=overwrite, progress=progress, space_check=space_check)


def shard(template: str | Path, ranks: int, out: str | Path, overwrite: bool = False,
          progress: bool | None = None, space_check: bool = True) -> dict:
    """Cut a rank template artifact into `ranks` rank artifacts under `out` (atomic); returns the ranks manifest."""
    template = Path(template)
    tman = artifact.load_manifest(template, verify=False)
    experts = int(tman["config"]["n_routed_experts"])
    check_ranks(ranks, experts)
    per = experts // ranks
    out = Path(out)
    check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    if space_check:
        artifact.clean_stale(out.parent)  # a killed run's temporaries are not counted as taken
        check_space(out.parent, ranks_disk_bytes(template, tman, ranks), f"--out {out} ({ranks} ranks)")
    rows = []
    with artifact.writing(out, overwrite) as tmp, artifact.stage_printer(progress) as stage:
        for r in range(ranks):
            with stage(f"rank {r + 1}/{ranks}: experts {r * per}..{(r + 1) * per - 1}"):
                rows.append(_write_rank(template, tman, tmp / RANK_DIR.format(r), r, ranks, per * r, per))
        man = _ranks_manifest(tman, rows, ranks, per)
        man["files"] = {f"{r['dir']}/{artifact.MANIFEST}": artifact.sha256(tmp / r["dir"] / artifact.MANIFEST)
                        for r in rows}  # each rank manifest hashes its own files
        (tmp / artifact.MANIFEST).write_text(json.dumps(man, indent=2) + "\n")
    return man


def _sharded(m: onnx.ModelProto, path: Path) -> set[str]:
    """The expert stacks a rank template's graph marks for cutting; ValueError for a graph that is no template."""
    sharded = set(json.loads(next((p.value for p in m.metadata_props if p.key == SHARDED_KEY), "null")) or [])
    if not sharded:
        raise ValueError(f"{path}: not a rank template (no {SHARDED_KEY} metadata; export with --ranks)")
    return sharded


def ranks_disk_bytes(template: Path, tman: dict, ranks: int) -> int:
    """What `ranks` rank artifacts cut from `template` take on disk: each replicated tensor once per rank, each
    expert stack once in all (E/N rows per rank), aligned, the holes of a sparse template excluded; plus the graph
    files once per rank. Read from the template's graphs (no weight is read)."""
    seen: set[str] = set()
    need = 0
    for info in tman["graphs"].values():
        path = template / info["file"]
        need += ranks * path.stat().st_size
        m = onnx.load(str(path), load_external_data=False)
        sharded = _sharded(m, path)
        for t in m.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL or t.name in seen:
                continue
            seen.add(t.name)
            ext = {e.key: e.value for e in t.external_data}
            held = allocated_bytes(template / ext["location"], int(ext.get("offset", 0)), int(ext["length"]))
            need += ranks * ALIGN + (held if t.name in sharded else ranks * held)
    return need


def _write_rank(template: Path, tman: dict, dest: Path, rank: int, ranks: int, offset: int, count: int) -> dict:
    dest.mkdir(parents=True)
    experts = int(tman["config"]["n_routed_experts"])
    weights_name = tman["weights_file"]
    graph_files = {info["file"] for info in tman["graphs"].values()}
    for rel in tman["files"]:
        if rel not in graph_files and rel != weights_name:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(template / rel, dest / rel)
    wf = WeightsFile(dest / weights_name)
    placed: dict[str, tuple[int, int, list[int]]] = {}
    expert_bytes = replicated_bytes = 0
    models, reduce_nodes = {}, {}
    try:
        for g, info in tman["graphs"].items():
            m = onnx.load(str(template / info["file"]), load_external_data=False)
            sharded = _sharded(m, template / info["file"])
            for t in m.graph.initializer:
                if t.data_location != onnx.TensorProto.EXTERNAL:
                    continue
                ext = {e.key: e.value for e in t.external_data}
                if t.name not in placed:
                    off, length = int(ext.get("offset", 0)), int(ext["length"])
                    dims = list(t.dims)
                    if t.name in sharded:
                        if dims[0] != experts or length % experts:
                            raise ValueError(f"{info['file']}: {t.name} {dims} is not a stack of {experts} experts")
                        row = length // experts
                        off, length, dims = off + offset * row, count * row, [count, *dims[1:]]
                        expert_bytes += length
                    else:
                        replicated_bytes += length
                    start = wf._pad()
                    wf.copy(template / ext["location"], off, length)
                    placed[t.name] = (start, length, dims)
                start, length, dims = placed[t.name]
                del t.dims[:]
                t.dims.extend(dims)
                _set_external(t, weights_name, start, length)
            found = _write_constants(m, offset, count)
            if missing := sorted(k for k in SENTINELS if not found.get(k)):
                raise ValueError(f"{info['file']}: rank constant(s) {missing} not found; the template was changed by "
                                 "a pass after shard_experts")
            del m.graph.value_info[:]  # shapes inferred from the template's sentinels and E-row stacks: re-inferred
            meta = {p.key: p.value for p in m.metadata_props}
            meta.update({"dsv4.rank": str(rank), "dsv4.ranks": str(ranks)})
            del m.metadata_props[:]
            onnx.helper.set_model_props(m, meta)
            reduce_nodes[g] = sum(1 for n in m.graph.node if f"{n.domain}.{n.op_type}" == COLLECTIVE["op"])
            models[g] = m
    except BaseException:
        wf.abort()
        raise
    wf.close()
    for g, m in models.items():
        onnx.save(m, str(dest / tman["graphs"][g]["file"]))
    man = json.loads(json.dumps(tman))
    for g, m in models.items():
        man["graphs"][g]["nodes"] = len(m.graph.node)
    man["rank"] = {"rank": rank, "ranks": ranks, "experts": [offset, offset + count], "collective": COLLECTIVE,
                   "all_reduces": reduce_nodes}
    man["files"] = artifact.file_table(dest, {weights_name: wf.sha256})
    artifact.write_manifest(dest, man)
    artifact.load_manifest(dest)  # the rank artifact passes the same checks as any artifact
    return {"dir": dest.name, "rank": rank, "experts": [offset, offset + count],
            "weights_bytes": man["files"][weights_name]["bytes"], "expert_bytes": expert_bytes,
            "replicated_bytes": replicated_bytes, "all_reduces": reduce_nodes}


def _set_external(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v


def _write_constants(m: onnx.ModelProto, offset: int, count: int) -> dict[str, int]:
    """Replace the template's sentinel constants by this rank's values; returns how many of each were found."""
    real = {"offset": offset, "start": offset, "end": offset + count, "count": count}
    by_value = {v: k for k, v in SENTINELS.items()}
    found: dict[str, int] = {}
    for node in m.graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        for a in node.attribute:
            if a.name != "value" or a.t.data_type != onnx.TensorProto.INT64:
                continue
            arr = numpy_helper.to_array(a.t)
            if arr.size == 1 and int(arr.reshape(-1)[0]) in by_value:
                key = by_value[int(arr.reshape(-1)[0])]
                a.t.CopyFrom(numpy_helper.from_array(np.full(arr.shape, real[key], dtype=np.int64), a.t.name))
                found[key] = found.get(key, 0) + 1
    return found


def _ranks_manifest(tman: dict, rows: list[dict], ranks: int, per: int) -> dict:
    cfg = tman["config"]
    layers = max(r["all_reduces"].get("decode", 0) for r in rows)
    ordered = bool(tman["graphs"]["decode"].get("pass_counts", {}).get("ordered_sum"))
    k = int(cfg["n_activated_experts"]) if ordered else 1
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "ranks": ranks, "target": tman["target"],
        "config": cfg,
        "experts": {"total": int(cfg["n_routed_experts"]), "per_rank": per,
                    "placement": "rank r holds experts r*per_rank .. (r+1)*per_rank-1 of every MoE layer"},
        "replicated": ["embeddings", "attention (+ compressors, indexer)", "router (gate, bias, tid2eid)",
                       "shared expert", "hyper-connections", "norms", "head", "decode state"],
        "collective": COLLECTIVE | {
            "per_step": layers,
            "sum": "ordered" if ordered else "partial",  # passes/ordered_sum.py: per-slot terms, single-rank order
            "payload": "[tokens, top_k, dim] fp32 per layer" if ordered else "[tokens, dim] fp32 per layer",
            "bytes_per_token": layers * k * int(cfg["dim"]) * 4,
            "shared_expert": "added once, after the all-reduce (replicated on every rank)"},
        "rank_dirs": rows,
    }
