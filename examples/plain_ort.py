"""Generate from a dsv4 artifact with nothing but onnxruntime and numpy (and `tokenizers` for text).

    python examples/plain_ort.py ART --prompt-ids 1,2,3 --max-new-tokens 16
    python examples/plain_ort.py ART --prompt "some text"          # with the artifact's tokenizer.json

Everything it needs is in the artifact: manifest.json names the graphs, the decode state (each ``past.*`` input
is fed by the ``present.*`` output of the same name), the ONNX Runtime settings the numerics depend on, and the
generation defaults (eos id). Greedy decoding; one sequence.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


def sessions(art: Path, man: dict) -> dict:
    settings = man.get("onnxruntime", {})
    for k, v in settings.get("environment", {}).items():  # read by ORT kernels at session creation
        os.environ.setdefault(k, str(v))
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                          settings.get("graph_optimization_level", "ORT_ENABLE_ALL"))
    for k, v in settings.get("session_config_entries", {}).items():
        so.add_session_config_entry(k, str(v))
    disabled = settings.get("disabled_optimizers", [])
    return {g: ort.InferenceSession(str(art / info["file"]), so, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=disabled)
            for g, info in man["graphs"].items() if g in ("prefill", "decode")}


def generate(art: Path, ids: list[int], max_new_tokens: int):
    """Yield greedy tokens of one sequence until eos or `max_new_tokens`."""
    man = json.loads((art / "manifest.json").read_text())
    sess = sessions(art, man)
    eos = man.get("generation", {}).get("eos_token_id", man["config"]["eos_token_id"])
    state = man["state"]  # [{"name", "past", "present", ...}], in the decode graph's input order

    def run(graph: str, feed: dict):
        s = sess[graph]
        out = dict(zip([o.name for o in s.get_outputs()], s.run(None, feed)))
        return out["logits"][:, -1], {e["past"]: out[e["present"]] for e in state}

    logits, past = run("prefill", {"input_ids": np.array([ids], dtype=np.int64)})
    for _ in range(max_new_tokens):
        tok = int(logits[0].argmax())
        yield tok
        if tok == eos:
            return
        logits, past = run("decode", {"input_ids": np.array([[tok]], dtype=np.int64), **past})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt-ids")
    g.add_argument("--prompt")
    p.add_argument("--max-new-tokens", type=int, default=16)
    a = p.parse_args()
    tok = None
    if a.prompt is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(a.artifact / "tokenizer.json"))
        ids = tok.encode(a.prompt).ids
    else:
        ids = [int(t) for t in a.prompt_ids.split(",")]
    out = []
    for t in generate(a.artifact, ids, a.max_new_tokens):
        out.append(t)
        if tok is None:
            print(t, end=" ", flush=True)
    print(tok.decode(out) if tok is not None else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
