"""An artifact as a complete model package: what an application needs besides the graphs (docs/usability.md).

``package(root, args, source, weights)`` runs inside ``build_manifest``, before the files are hashed:

- ``config.json`` under the official key names (the checkpoint's own file when the whole model was exported,
  else ``args.to_hf_config()``) and the checkpoint's tokenizer / generation files, copied in;
- the manifest sections ``generation`` (bos/eos ids, temperature, top-p, top-k: the checkpoint's
  generation_config.json where it has one, else greedy) and ``onnxruntime`` (the session settings the artifact's
  numerics depend on, so that a program using plain onnxruntime can honour them);
- ``source.identity``: the sha256 of the checkpoint's index and config.json (the same bytes give the same id on
  any host), next to the path it was read from on this host;
- ``metadata_props`` in each .onnx (format, graph, target, the checkpoint identity), so a graph file alone says
  what it is.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import onnx

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
# files of a Hugging Face model directory that an application reads besides the weights
SHIPPED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
           "chat_template.jinja")


def checkpoint_identity(ck: Path) -> dict:
    """sha256 over the index (every tensor's shard) and config.json of checkpoint `ck`: its identity, not its path."""
    h = hashlib.sha256()
    parts = [f for f in (INDEX, CONFIG) if (ck / f).is_file()]
    for f in parts:
        h.update(f.encode() + b"\0" + (ck / f).read_bytes() + b"\0")
    return {"sha256": h.hexdigest(), "of": parts}


def ort_settings(weights: str) -> dict:
    """The ONNX Runtime settings the artifact's numerics depend on (runtimes/ort/session.py applies them)."""
    return {
        "graph_optimization_level": "ORT_ENABLE_ALL",
        # packed weights: ConstantFolding would fold the in-graph dequantisation of the uint8 weights into fp32
        # initializers at load (4-8x the memory, and no longer the artifact's numerics path)
        "disabled_optimizers": ["ConstantFolding"] if weights == "packed" else [],
        "session_config_entries": {},
        # QMoE (MXFP4 experts) is exact only on ORT's dequantise + fp32 GEMM path; read at session creation
        "environment": {"ORT_QMOE_CPU_QNBIT_GEMM": "fp32"},
    }


def generation(args, root: Path) -> dict:
    gen = {"bos_token_id": args.bos_token_id, "eos_token_id": args.eos_token_id, "temperature": 0.0, "top_p": 1.0,
           "top_k": 0}
    p = root / "generation_config.json"
    if p.is_file():
        try:
            cfg = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e})") from None
        sample = cfg.get("do_sample", True)
        for k in ("bos_token_id", "eos_token_id") + (("temperature", "top_p", "top_k") if sample else ()):
            if isinstance(cfg.get(k), (int, float)) and not isinstance(cfg.get(k), bool):
                gen[k] = cfg[k]
    return gen


def package(root: Path, args, source: dict, weights: str, target: str, graph_files: list[str],
            checkpoint: Path | None = None) -> dict:
    """Copy the checkpoint's files into `root`, stamp the graphs; returns the manifest sections to add.
    `checkpoint`: the directory read (also a preset's temporary synthetic one). The source is recorded by its
    identity (``checkpoint_identity``), never by a host path (runtimes/eager.py finds it by that identity)."""
    src = {k: v for k, v in source.items() if k != "path"}
    files = Path(checkpoint) if checkpoint is not None else None
    if files is not None and files.is_dir():
        src["identity"] = checkpoint_identity(files)
        for f in SHIPPED:
            if (files / f).is_file() and not (root / f).exists():
                shutil.copy2(files / f, root / f)
    if files is not None and (files / CONFIG).is_file() and source.get("layers") is None:
        shutil.copy2(files / CONFIG, root / CONFIG)  # verbatim: the official file, keys this version may not read
    else:
        (root / CONFIG).write_text(json.dumps(args.to_hf_config(), indent=2) + "\n")
    props = {"dsv4.format": "dsv4-artifact", "dsv4.target": target, "dsv4.weights": weights,
             "dsv4.config": CONFIG, "dsv4.source": json.dumps(src)}
    for f in graph_files:
        stamp(root / f, props | {"dsv4.graph": f.removesuffix(".onnx")})
    return {"source": src, "generation": generation(args, root), "onnxruntime": ort_settings(weights),
            "config_json": CONFIG, "tokenizer": "tokenizer.json" if (root / "tokenizer.json").is_file() else None,
            "shipped": sorted(f for f in SHIPPED if (root / f).is_file())}


def stamp(path: Path, props: dict[str, str]) -> None:
    """Set `props` as the model's metadata_props (weights stay where they are: external data is not loaded)."""
    m = onnx.load(str(path), load_external_data=False)
    keep = [p for p in m.metadata_props if p.key not in props]
    del m.metadata_props[:]
    m.metadata_props.extend(keep)
    for k, v in props.items():
        m.metadata_props.add(key=k, value=str(v))
    onnx.save(m, str(path))
