"""The docs/PERF.md section of benchmarks/export_flash.py: measured slices, the expert encodings' decode speed, the
tiny export's CPU, and the projection to the whole Flash and Pro from the measured per-layer costs."""

from __future__ import annotations

from pathlib import Path

GB = 1e9
BEGIN, END = "<!-- export_flash:begin -->", "<!-- export_flash:end -->\n"


def _trace(st: dict) -> str:
    """Trace seconds: one step trace (export/step.py), or the older prefill + decode pair."""
    return f"{st['trace step']:.0f} s" if "trace step" in st else \
        f"{st.get('trace prefill', 0):.0f} + {st.get('trace decode', 0):.0f} s"


def _slices_table(slices: dict) -> list[str]:
    rows = ["| slice | checkpoint | artifact (× ckpt) | weights.data / bytes read | peak RSS | weights written | "
            "trace (step, or prefill + decode) | fold + passes | save + check + sha256 | wall | CPU user + sys |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for _key, s in sorted(slices.items(), key=lambda kv: (kv[1]["preset"], kv[1]["layers"], kv[1]["sparse"],
                                                            kv[1].get("mtp", False))):
        st, ex = s["stages"], s["export"]
        fold = sum(v for k, v in st.items() if k.startswith("fold"))
        rate = "holes (n/a)" if s["sparse"] else (f"{s['weights_s']:.0f} s, {s['mb_s']:.0f} MB/s (disk: "
                                                   f"{s.get('disk_mb_s', 0):.0f} MB/s)")
        rows.append(
            f"| {s['preset']} {s['layers']} layers{' (sparse)' if s['sparse'] else ''}, --experts {s['experts']}"
            f"{' --mtp' if s.get('mtp') else ''} | "
            f"{s['ckpt_bytes'] / GB:.2f} GB | {s['artifact_bytes'] / GB:.2f} GB ({s['ratio']:.3f}×) | "
            f"{s['weights_bytes'] / max(s['source_bytes'], 1):.3f}× | "
            f"{ex['rss_kb'] * 1e3 / GB:.2f} GB | {rate} | {_trace(st)} | {fold:.0f} s | {_save(st):.0f} s | {ex['wall_s']:.0f} s | "
            f"{ex['user_s']:.0f} + {ex['sys_s']:.0f} s |")
    notes = [f"- {s['preset']} {s['layers']} layers: {s['note']}" for s in slices.values() if s.get("note")]
    return rows + ([""] + notes if notes else [])


def _save(st: dict) -> float:
    return st.get("save", 0) + st.get("manifest (sha256)", 0)


def _projection(slices: dict) -> list[str]:
    from dsv4.models.checkpoint import official_totals
    from dsv4.models.config import preset

    real = [s for s in slices.values() if not s["sparse"] and not s.get("note") and not s.get("mtp")]
    if not real:
        return []
    r = max(real, key=lambda s: s["layers"])
    rate = r["source_bytes"] / r["weights_s"]  # the MTP block is not in the graphs: rates per byte read
    per_byte = r["weights_bytes"] / r["source_bytes"]  # artifact bytes per checkpoint byte read
    by_layers = sorted((s for s in slices.values() if s["preset"] == "flash" and s["source_bytes"]),
                       key=lambda s: s["layers"])
    fold = [(s["layers"], sum(v for k, v in s["stages"].items() if k.startswith("fold"))) for s in by_layers]
    per_layer_fold = (fold[-1][1] - fold[0][1]) / (fold[-1][0] - fold[0][0]) if len(fold) > 1 else fold[0][1] / fold[0][0]
    # saving + checking the graphs grows with their nodes (the layers); weights.data is hashed while written
    per_layer_save = max(_save(s["stages"]) for s in by_layers) / max(s["layers"] for s in by_layers)
    # a 1- or 2-layer slice traces one kind; a whole model traces its four (an upper bound: the window kind of
    # layers 0-1 is the cheapest), whatever its depth
    one_kind = {s["preset"]: s["trace_s"] for s in sorted(slices.values(), key=lambda s: -s["layers"]) if s["layers"] <= 2}
    rss = max(s["export"]["rss_kb"] for s in slices.values()) * 1e3 / GB
    rss_of = ", ".join(f"{s['export']['rss_kb'] * 1e3 / GB:.2f} GB at {s['preset']} {s['layers']}"
                       for s in sorted(slices.values(), key=lambda s: (s["preset"], s["layers"])) if not s.get("mtp"))
    out = ["", "Projection (per-layer costs above; trace = the measured trace of the deepest slice with all four kinds "
           "(the whole model when measured), else 4 × the one-kind trace of that model's slice; peak RSS = the "
           f"largest measured, which grows with the graphs ({rss_of});",
           f"weights at the measured {rate / 1e6:.0f} MB/s of checkpoint bytes, fold + passes {per_layer_fold:.1f} s "
           f"and save + check {per_layer_save:.2f} s per layer):", "",
           "| model | checkpoint | artifact (default) | trace | fold + passes | weights | save + check | total | peak RSS |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("flash", "pro"):
        a = preset(name)
        b = sum(d["bytes"] for d in official_totals(a).values())
        art = b * per_byte
        f = per_layer_fold * a.n_layers
        w, sv = b / rate, per_layer_save * a.n_layers
        four = sorted((s["layers"], s["trace_s"]) for s in slices.values() if s["preset"] == name and s["layers"] >= 5)
        trace4 = four[-1][1] if four else 4 * one_kind.get(name, one_kind.get("flash", 0.0))  # the deepest: all kinds
        tot = trace4 + f + w + sv
        out.append(f"| {name} ({a.n_layers} layers + MTP) | {b / GB:.0f} GB | ~{art / GB:.0f} GB | ~{trace4:.0f} s | "
                   f"~{f:.0f} s | ~{w / 60:.0f} min | ~{sv:.0f} s | ~{tot / 60:.0f} min | ≤ {rss:.1f} GB |")
    return out


def _whole(slices: dict) -> list[str]:
    """A note on the sparse slices that hold a whole model: what they measure and what their holes hide."""
    from dsv4.models.config import preset

    whole = [s for s in slices.values() if s["sparse"] and s["layers"] == preset(s["preset"]).n_layers]
    if not whole:
        return []
    parts = [f"{s['preset']} {s['layers']} layers: {(s['weights_bytes'] - s.get('artifact_blocks', 0)) / GB:.0f} GB of "
             f"holes hashed, {s.get('artifact_blocks', 0) / GB:.1f} GB of derived re-layouts written as data"
             for s in whole]
    return ["", "The sparse slices with every layer are the whole models, measured end to end: everything but the disk "
            "rate (" + "; ".join(parts) + ")."]


def _decode(d: dict) -> list[str]:
    rows = ["", f"Decode speed of the two MXFP4 expert encodings (Flash dimensions, {d.get('layers', 2)} layer(s), {d['experts']} routed "
            "experts, quant_sim off, ORT CPU 2 threads, the 5th of 8 sorted greedy steps after an 8-token prefill):", "",
            "| --experts | weights.data | × checkpoint | decode step | prefill (8 tokens) |", "|---|---:|---:|---:|---:|"]
    for mode, m in d["modes"].items():
        rows.append(f"| {mode} | {m['weights_bytes'] / GB:.2f} GB | {m['ratio']:.3f}× | {m['step_s'] * 1e3:.0f} ms | "
                    f"{m['prefill_s']:.2f} s |")
    mo = d["modes"]
    if {"packed", "int8"} <= set(mo):
        rows += ["", f"int8 decodes {mo['packed']['step_s'] / mo['int8']['step_s']:.2f}× faster than packed here, at "
                 "2× the routed experts' bytes (8 experts are a small share of this 1-layer file; on the 2-layer "
                 "Flash slice with its 256 experts int8 measured 1.51× the checkpoint): the default stays packed, "
                 "the only encoding within issue [9]'s 1.10×; `--experts int8` is there for decode-bound users "
                 "with the disk and memory to spare."]
    return rows


def _load(r: dict) -> str:
    loads = [s["export"].get("loadavg_1min_after") for s in r.get("slices", {}).values()]
    loads = [x for x in loads if x is not None]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "not recorded"


def write_perf(path: Path, r: dict) -> None:
    lines = [BEGIN, "## Real-size export (`benchmarks/export_flash.py`, issue [9])", "",
             f"{r['date']}, {r['machine']}, CPU only; 1-minute load average after each export {_load(r)} on 2 cores. "
             "Each export is a child process; RSS = its peak resident set (ru_maxrss). Sparse slices hold zero data in "
             "file holes: same code path, headers and sizes as a real checkpoint; they measure memory and trace time, "
             "not disk rates.", ""]
    if r.get("slices"):
        lines += _slices_table(r["slices"]) + _projection(r["slices"])
        lines += ["", "Notes: a real slice is the whole output of `dsv4 checkpoint make --preset P --layers N` (real data, "
                  "with the MTP block, which the default graphs do not read: `weights.data / bytes read` compares the "
                  "artifact with the checkpoint bytes it exports; `:mtp` slices export it with `--mtp`). The "
                  "checkpoint's pages are dropped from the page cache before each export (cold reads, as a first "
                  "export). `disk` = a plain 1 GB copy_file_range + fsync of a cold shard right after the export: "
                  "what the disk gave then. `save + check + sha256` = the graphs saved and checked plus the manifest's "
                  "hashes (weights.data's is computed while it is written). A 1-2 layer slice traces one layer kind, a "
                  "slice of 5+ layers all four (the same representative model for 8 or 43 layers: `export/layers.py`)."]
        lines += _whole(r["slices"])
    if r.get("decode"):
        lines += _decode(r["decode"])
    if r.get("tiny"):
        t = r["tiny"]
        lines += ["", f"`dsv4 export --preset tiny` (ort-cpu, the pass pipeline): {t['user_s'] + t['sys_s']:.0f} s of CPU "
                  f"(user {t['user_s']:.0f} s + system {t['sys_s']:.0f} s), {t['wall_s']:.0f} s wall, peak RSS "
                  f"{t['rss_kb'] * 1e3 / GB:.2f} GB."]
    lines.append(END)
    body = "\n".join(lines)
    text = path.read_text() if path.exists() else "# dsv4 performance notes\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + body + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + body
    path.write_text(text)
