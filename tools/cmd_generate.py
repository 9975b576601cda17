"""``dsv4 generate ART --prompt TEXT`` or ``--prompt-ids 1,2,3;4,5`` (sequences of any lengths).

With a tokenizer in the artifact the output is text, streamed as it comes (one sequence) or one line per sequence
(a batch); ``--ids`` prints token ids instead. A sequence stops at the artifact's eos id or a ``--stop`` id. The
prefill and decode rates go to stderr at the end. Every argument is checked before the artifact is loaded.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate tokens with an artifact (ONNX Runtime)")
    p.add_argument("artifact")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt-ids", help="comma-separated token ids; ';' separates sequences (any lengths)")
    g.add_argument("--prompt", help="text (needs the tokenizer.json the checkpoint shipped, and `tokenizers`)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=None,
                   help="0: greedy (default: the artifact's generation defaults, greedy when it has none)")
    p.add_argument("--top-p", type=float, default=None, help="default: the artifact's, else 1")
    p.add_argument("--top-k", type=int, default=None, help="0: no limit (default: the artifact's, else 0)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", help="comma-separated token ids that end a sequence (besides the eos id)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the artifact's eos id")
    p.add_argument("--ids", action="store_true", help="print token ids, not text, even with a tokenizer")
    p.add_argument("--speculative", action="store_true",
                   help="greedy speculative decoding with the MTP graph (an artifact exported with --mtp; one "
                        "prompt); prints the draft acceptance rate")
    p.add_argument("--providers", help="comma-separated ONNX Runtime execution providers")
    p.add_argument("--backend", default="ort", choices=("ort", "tvm"), help="runtime that runs the artifact")
    p.add_argument("--tvm-target", default="tvm-llvm", choices=("tvm-llvm", "tvm-cuda"), help="with --backend tvm")
    p.add_argument("--compiled", help="with --backend tvm: a `dsv4 compile` directory (default: compile now)")
    p.add_argument("--ranks", type=int, default=None,
                   help="an expert-parallel artifact (export --ranks N): launch its N ranks on this machine")
    p.add_argument("--threads", type=int, default=None, help="with --ranks: ONNX Runtime threads per rank "
                   "(default: cores / ranks)")
    p.set_defaults(func=run)


def parse_ids(s: str, flag: str = "--prompt-ids") -> list[list[int]]:
    try:
        rows = [[int(t) for t in row.split(",") if t.strip()] for row in s.split(";")]
    except ValueError as e:
        raise ValueError(f"{flag}: expected comma-separated integers, got {s!r}") from e
    if not rows or any(not r for r in rows):
        raise ValueError(f"{flag}: every sequence needs at least one id, got {s!r}")
    return rows


def run(a: argparse.Namespace) -> int:
    from dsv4.runtimes.base import check_sampling, generation_defaults

    stop = parse_ids(a.stop, "--stop")[0] if a.stop else None
    given = {"temperature": a.temperature, "top_p": a.top_p, "top_k": a.top_k}
    check_sampling(a.max_new_tokens, *(v if v is not None else d for v, d in zip(given.values(), (0.0, 1.0, 0))),
                   a.seed, stop, flag=True)  # before any work
    ids = parse_ids(a.prompt_ids) if a.prompt is None else None
    if getattr(a, "ranks", None) is not None:  # launch the ranks, each runs this command (tools/cmd_ranks.py)
        from .cmd_ranks import generate

        return generate(a)
    if getattr(a, "generator", None) is not None:  # one rank of a launched run
        gen = a.generator
    elif a.backend == "tvm":
        from dsv4.runtimes.tvm import Generator as TVMGenerator

        gen = TVMGenerator(a.artifact, compiled=a.compiled, target=a.tvm_target)
    else:
        from dsv4.runtimes.ort import Generator

        gen = Generator(a.artifact, providers=a.providers.split(",") if a.providers else None)
    # flags not given: the artifact's generation defaults (its checkpoint's generation_config.json), as HF does
    defaults = generation_defaults(gen.manifest)
    a.temperature, a.top_p, a.top_k = (v if v is not None else defaults[k] for k, v in given.items())
    check_sampling(a.max_new_tokens, a.temperature, a.top_p, a.top_k, a.seed, stop)  # a manifest's values too
    tok = _tokenizer(gen, required=a.prompt is not None) if not (a.ids and a.prompt is None) else None
    if a.prompt is not None:
        ids = [tok.encode(a.prompt).ids]
        if not ids[0]:
            raise ValueError(f"--prompt: the tokenizer turned {a.prompt!r} into no ids")
    text, one = tok is not None and not a.ids, len(ids) == 1
    stream = _TextStream(tok) if text and one else None
    new: list[list[int]] = [[] for _ in ids]
    if a.speculative and (a.temperature != 0 or len(ids) != 1 or a.backend != "ort"):
        raise ValueError("--speculative: greedy (temperature 0), one prompt, the ort backend")
    tokens = gen.generate_speculative(ids[0], a.max_new_tokens, stop, a.ignore_eos) if a.speculative else \
        gen.generate(ids, a.max_new_tokens, a.temperature, a.top_p, a.top_k, a.seed, stop, a.ignore_eos)
    for t in tokens:
        for i, v in enumerate(t.tolist()):
            if v >= 0:
                new[i].append(v)
        if stream:
            stream.update(new[0])
        elif one:  # one sequence's ids, streamed on one line
            print(int(t[0]), end=" ", flush=True)
    if stream:
        stream.finish(new[0])
    elif one:
        print()
    else:  # a batch: one line per sequence
        for row in new:
            print(tok.decode(row) if text else " ".join(map(str, row)))
    s = gen.stats
    print(f"prefill: {s['prefill_tokens']} tokens in {s['prefill_s']:.2f} s ({_rate(s['prefill_tokens'], s['prefill_s'])}"
          f"); decode: {s['decode_tokens']} tokens in {s['decode_s']:.2f} s ({_rate(s['decode_tokens'], s['decode_s'])})",
          file=sys.stderr)
    if a.speculative:
        print(f"speculative: {s['accepted']} of {s['drafted']} MTP drafts accepted (acceptance {s['acceptance']:.1%}), "
              f"{s['main_calls']} main-model calls for {s['decode_tokens']} tokens", file=sys.stderr)
    if getattr(gen, "log", None):  # the TVM Generator compiled the graphs here
        print(f"TVM log: {gen.log}", file=sys.stderr)
    return 0


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:.1f} tokens/s" if seconds > 0 else "- tokens/s"


class _TextStream:
    """Print the text of one sequence as its tokens come: decode everything generated so far and print what is
    new (a token alone can be half a UTF-8 character, or lack the space its neighbour implies); an incomplete
    character waits for the next token."""

    def __init__(self, tok):
        self.tok, self.shown = tok, ""

    def update(self, ids: list[int]) -> None:
        text = self.tok.decode(ids)
        if not text.endswith("\ufffd") and text.startswith(self.shown):
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text

    def finish(self, ids: list[int]) -> None:
        text = self.tok.decode(ids)
        print(text[len(self.shown):] if text.startswith(self.shown) else "\n" + text)


def _tokenizer(gen, required: bool = True):
    """The artifact's tokenizer; None when it has none and `required` is False (then ids are printed)."""
    man = gen.manifest
    if not man.get("tokenizer"):
        if required:
            raise ValueError("--prompt: the artifact has no tokenizer.json (its checkpoint shipped none); use "
                             "--prompt-ids")
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        if not required:
            return None
        raise ValueError("--prompt: needs the `tokenizers` package (pip install 'dsv4[tokenizer]')") from e
    return Tokenizer.from_file(str(gen.art / man["tokenizer"]))
