"""Greedy speculative decoding with V4's MTP block (artifacts exported with ``--mtp``, export/mtp.py).

Per round, the MTP graph drafts the token after next from the main model's final streams; the verify graph runs
the main model on [next, draft] in one call: if its logits at `next` pick the draft, both tokens are kept and the
logits at the draft give one more (two or three tokens per main call); otherwise the draft is dropped and the
state is recomputed from the state before the round with `next` alone (the decode graph), so the kept state
never holds a rejected token. The MTP state only ever sees accepted (streams, next token) pairs. The tokens are
plain greedy decoding's: every kept token is the argmax of the main model's logits at its position.
"""

from __future__ import annotations

import time

import numpy as np

from dsv4.export.signature import CAPACITY, HIDDEN, INPUT_IDS, past, present

from ..base import CapacityError


def _fresh(layout: list[dict], batch: int) -> dict[str, np.ndarray]:
    return {e["name"]: np.full([batch, *e["shape"][1:]], float(e["fill"]) if isinstance(e["fill"], str) else e["fill"],
                               dtype=e["dtype"]) for e in layout}


def generate_speculative(gen, prompt, max_new_tokens: int, stop=None, ignore_eos: bool = False):
    """Yield the greedy continuation of one prompt token by token (as ``generate`` would, batch 1); after the loop
    ``gen.stats`` holds the token counts, seconds, drafts, accepted drafts and the acceptance rate."""
    man = gen.manifest
    if not man.get("mtp") or "verify" not in gen.sessions or "mtp" not in gen.sessions:
        raise ValueError(f"speculative decoding: {gen.art} has no MTP graphs (export with --mtp)")
    if gen.static:
        raise ValueError("speculative decoding: needs a dynamic-shape artifact")
    ids = gen._ids(np.asarray(prompt)[None] if np.asarray(prompt).ndim == 1 else prompt, "prompt")
    if ids.shape[0] != 1:
        raise ValueError(f"speculative decoding: one prompt at a time, got a batch of {ids.shape[0]}")
    eos = None if ignore_eos else man.get("generation", {}).get("eos_token_id")
    stops = {int(s) for s in (stop or [])} | ({int(eos)} if eos is not None else set())
    names, mnames = gen.names, [e["name"] for e in man["mtp_state"]]
    s = gen.sessions

    grow = gen.capacity is not None and gen.capacity.growable

    def main(graph, toks, state):
        if state is None:  # prefill: the state starts small where it can grow (docs/capacity.md)
            feed = {CAPACITY: np.array(gen.capacity.start(toks.shape[1], gen.start_capacity), dtype=np.int64)} if grow else {}
        else:  # room for the tokens of this call
            state = gen._fit(state, int(state["pos"].max()) + toks.shape[1])
            feed = {past(n): state[n] for n in names}
        out = dict(zip((o.name for o in s[graph].get_outputs()), s[graph].run(None, {INPUT_IDS: toks} | feed)))
        return out["logits"], {n: out[present(n)] for n in names}, out[HIDDEN]

    def mtp(hidden, toks, state):
        out = dict(zip((o.name for o in s["mtp"].get_outputs()),
                       s["mtp"].run(None, {HIDDEN: hidden, INPUT_IDS: toks, **{past(n): state[n] for n in mnames}})))
        return int(out["logits"][0, -1].argmax()), {n: out[present(n)] for n in mnames}

    st = {"prefill_tokens": ids.shape[1], "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0, "drafted": 0,
          "accepted": 0, "main_calls": 0}
    gen.stats = st
    t = time.perf_counter()
    logits, state, hidden = main("prefill", ids, None)
    nxt = int(logits[0, -1].argmax())
    draft, mstate = mtp(hidden, np.array([[*ids[0, 1:], nxt]], dtype=np.int64), _fresh(man["mtp_state"], 1))
    st["prefill_s"] = time.perf_counter() - t
    done = 0
    while True:
        yield np.array([nxt], dtype=np.int64)
        done += 1
        if done == max_new_tokens or nxt in stops:
            break
        if int(state["pos"].max()) + 2 > gen.max_seq_len:
            raise CapacityError(f"generate: stopped after {done} of {max_new_tokens} new tokens: max_seq_len="
                                f"{gen.max_seq_len} reached")
        t = time.perf_counter()
        logits, new_state, h = main("verify", np.array([[nxt, draft]], dtype=np.int64), state)
        st["drafted"] += 1
        st["main_calls"] += 1
        if int(logits[0, 0].argmax()) == draft:  # the draft is the main model's next token: keep both
            st["accepted"] += 1
            after = int(logits[0, 1].argmax())
            state = new_state
            draft_next, mstate = mtp(h, np.array([[draft, after]], dtype=np.int64), mstate)
            st["decode_s"] += time.perf_counter() - t
            st["decode_tokens"] += 1
            yield np.array([draft], dtype=np.int64)
            done += 1
            if done == max_new_tokens or draft in stops:
                break
            nxt, draft = after, draft_next
        else:  # rejected: the state before the round + `nxt` alone
            logits, state, h = main("decode", np.array([[nxt]], dtype=np.int64), state)
            st["main_calls"] += 1
            after = int(logits[0, -1].argmax())
            draft, mstate = mtp(h, np.array([[after]], dtype=np.int64), mstate)
            nxt = after
            st["decode_s"] += time.perf_counter() - t
        st["decode_tokens"] += 1
    st["acceptance"] = st["accepted"] / st["drafted"] if st["drafted"] else 0.0
