"""``dsv4 generate ART --prompt-ids 1,2,3 --max-new-tokens N`` (or ``--prompt TEXT`` with a tokenizer.json)."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate tokens with an artifact (ONNX Runtime)")
    p.add_argument("artifact")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt-ids", help="comma-separated token ids; ';' separates sequences of a batch")
    g.add_argument("--prompt", help="text (needs the tokenizer.json the checkpoint shipped, and `tokenizers`)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--providers", help="comma-separated ONNX Runtime execution providers")
    p.add_argument("--backend", default="ort", choices=("ort", "tvm"), help="runtime that runs the artifact")
    p.add_argument("--tvm-target", default="tvm-llvm", choices=("tvm-llvm", "tvm-cuda"), help="with --backend tvm")
    p.add_argument("--compiled", help="with --backend tvm: a `dsv4 compile` directory (default: compile now)")
    p.set_defaults(func=run)


def parse_ids(s: str) -> list[list[int]]:
    try:
        rows = [[int(t) for t in row.split(",") if t.strip()] for row in s.split(";")]
    except ValueError as e:
        raise ValueError(f"--prompt-ids: expected comma-separated integers, got {s!r}") from e
    if not rows or any(not r for r in rows) or len({len(r) for r in rows}) != 1:
        raise ValueError("--prompt-ids: every sequence needs the same, non-zero number of ids")
    return rows


def run(a: argparse.Namespace) -> int:
    import numpy as np

    if a.backend == "tvm":
        from dsv4.runtimes.tvm import Generator as TVMGenerator

        gen = TVMGenerator(a.artifact, compiled=a.compiled, target=a.tvm_target)
    else:
        from dsv4.runtimes.ort import Generator

        gen = Generator(a.artifact, providers=a.providers.split(",") if a.providers else None)
    tok = None
    if a.prompt is not None:
        tok = _tokenizer(gen)
        ids = [tok.encode(a.prompt).ids]
        if not ids[0]:
            raise ValueError(f"--prompt: the tokenizer turned {a.prompt!r} into no ids")
    else:
        ids = parse_ids(a.prompt_ids)
    new, shown = [], ""
    for t in gen.generate(np.array(ids, dtype=np.int64), a.max_new_tokens, a.temperature, a.top_p, a.seed):
        if tok is None:
            print(" ".join(str(int(v)) for v in t), flush=True)
            continue
        # decode everything generated so far and print what is new: a token alone can be half a UTF-8 character
        # or lack the space its neighbour implies; an incomplete character waits for the next token
        new.append(int(t[0]))
        text = tok.decode(new)
        if not text.endswith("\ufffd") and text.startswith(shown):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    if tok is not None:
        print(tok.decode(new)[len(shown):])
    return 0


def _tokenizer(gen):
    man = gen.manifest
    if not man.get("tokenizer"):
        raise ValueError("--prompt: the artifact has no tokenizer.json (its checkpoint shipped none); use --prompt-ids")
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ValueError("--prompt: needs the `tokenizers` package (pip install 'dsv4[tokenizer]')") from e
    return Tokenizer.from_file(str(gen.art / man["tokenizer"]))
