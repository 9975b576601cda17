"""Parse-time limits of CANN's ONNX parser, read from the notes column of ``passes/rules/ascend/atc_onnx_ops.tsv``.

Each note is a ``;``-separated list of clauses (the first may start with ``plugin:``). A clause that matches one of
the grammars below becomes a ``Limit`` checked on every node of that op; any other clause (informational, or a limit
too specific for a grammar: "2D/3D kernel only", Split's divisibility, ...) is kept as unparsed, and
docs/ascend_rules.md lists those. No op name appears here: the table says which op a limit belongs to.

Grammars (``A`` an attribute name, ``N`` an integer, ``V`` a word):

* ``A must be V`` / ``A must be V or V`` / ``A must be V/V/V`` / ``A V/V/V``: the value is one of them (an integer
  attribute holding a data type also matches by its type name: ``dtype must be float32/float16``);
* ``A must be 1D/2D/3D``: the list attribute has one of those lengths;
* ``A must be >= N``, ``A must be odd``, ``A, A must each have length N``, ``A length must be N``;
* ``A attribute required``; ``A='V' rejected``, ``A=V not honoured``: the value is not V;
* ``needs >=N inputs``, ``N or M inputs only``, ``exactly one output``, ``second output (X) rejected``.

An attribute the node does not set takes its onnx schema default at the model's opset; with no default it passes
every limit but ``required``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import onnx
from onnx import helper

_WORDS = {"one": 1, "two": 2, "three": 3, "first": 1, "second": 2, "third": 3}
_ALIASES = {"float": "float32", "double": "float64"}  # onnx type names vs the names the notes use
_MISSING = object()


def type_names(elem: int) -> set[str]:
    """'float' and 'float32' for TensorProto.FLOAT; the lower-case onnx name otherwise."""
    name = onnx.TensorProto.DataType.Name(elem).lower()
    return {name, _ALIASES.get(name, name)}


@dataclass(frozen=True)
class Limit:
    clause: str  # the note text it was parsed from
    kind: str  # a key of _CHECKS
    names: tuple[str, ...]  # attribute names (empty for input/output counts)
    values: tuple[str, ...]

    def check(self, node: onnx.NodeProto, schema: onnx.defs.OpSchema | None) -> str | None:
        """None when `node` meets the limit, else what it has instead."""
        return _CHECKS[self.kind](self, node, schema)


def _value(node: onnx.NodeProto, name: str, schema):
    a = next((a for a in node.attribute if a.name == name), None)
    if a is None and schema is not None and name in schema.attributes:
        d = schema.attributes[name].default_value
        a = d if d.type != onnx.AttributeProto.UNDEFINED else None
    if a is None:
        return _MISSING
    v = helper.get_attribute_value(a)
    return v.decode() if isinstance(v, bytes) else v


def _one_of(lim: Limit, node, schema):
    v = _value(node, lim.names[0], schema)
    if v is _MISSING or str(v) in lim.values or (isinstance(v, int) and type_names(v) & set(lim.values)):
        return None
    return f"{lim.names[0]}={v}"


def _ranks(lim: Limit, node, schema):
    v = _value(node, lim.names[0], schema)
    ok = v is _MISSING or f"{len(v)}D" in lim.values
    return None if ok else f"{lim.names[0]} has {len(v)} entries"


def _at_least(lim: Limit, node, schema):
    v = _value(node, lim.names[0], schema)
    return None if v is _MISSING or v >= int(lim.values[0]) else f"{lim.names[0]}={v}"


def _odd(lim: Limit, node, schema):
    v = _value(node, lim.names[0], schema)
    return None if v is _MISSING or v % 2 == 1 else f"{lim.names[0]}={v}"


def _length(lim: Limit, node, schema):
    bad = [f"{n} has {len(v)} entries" for n in lim.names
           if (v := _value(node, n, schema)) is not _MISSING and len(v) != int(lim.values[0])]
    return "; ".join(bad) or None


def _required(lim: Limit, node, schema):
    return None if any(a.name == lim.names[0] for a in node.attribute) else f"no {lim.names[0]} attribute"


def _not(lim: Limit, node, schema):
    v = _value(node, lim.names[0], schema)
    return None if v is _MISSING or str(v) != lim.values[0] else f"{lim.names[0]}={v}"


def _min_inputs(lim: Limit, node, schema):
    return None if len(node.input) >= int(lim.values[0]) else f"{len(node.input)} inputs"


def _inputs(lim: Limit, node, schema):
    return None if str(len(node.input)) in lim.values else f"{len(node.input)} inputs"


def _outputs(lim: Limit, node, schema):
    n = sum(1 for o in node.output if o)
    return None if n == int(lim.values[0]) else f"{n} outputs"


def _no_output(lim: Limit, node, schema):
    i = int(lim.values[0])
    return None if len(node.output) <= i or not node.output[i] else f"output {i} ({node.output[i]}) is used"


_CHECKS = {"one_of": _one_of, "ranks": _ranks, "at_least": _at_least, "odd": _odd, "length": _length,
           "required": _required, "not": _not, "min_inputs": _min_inputs, "inputs": _inputs, "outputs": _outputs,
           "no_output": _no_output}

_V = r"[\w.]+"
_GRAMMARS: tuple[tuple[str, re.Pattern], ...] = tuple((k, re.compile(p)) for k, p in (
    ("at_least", r"(?P<a>\w+) must be >= (?P<v>\d+)\b"),
    ("odd", r"(?P<a>\w+) must be odd\b"),
    ("ranks", r"(?P<a>\w+) must be (?P<v>\d+D(?:/\d+D)*)\b"),
    ("length", r"(?P<a>\w+(?:, \w+)*) (?:must each have length|length must be) (?P<v>\d+)\b"),
    ("one_of", rf"(?P<a>\w+) must be (?P<v>{_V}(?:(?:/| or ){_V})*)(?: \(.*\))?$"),
    ("one_of", rf"(?P<a>\w+) (?P<v>{_V}(?:/{_V})+)$"),
    ("required", r"(?P<a>\w+) attribute required$"),
    ("not", r"(?P<a>\w+)='?(?P<v>[\w.]+)'? (?:rejected|not honoured)\b"),
    ("min_inputs", r"needs >=(?P<v>\d+) inputs\b"),
    ("inputs", r"(?P<v>\d+(?: or \d+)+) inputs only$"),
    ("outputs", r"exactly (?P<v>one|two|three|\d+) outputs?$"),
    ("no_output", r"(?P<v>first|second|third) output(?: \(\w+\))? rejected$"),
))


def parse_clause(clause: str) -> Limit | None:
    for kind, pattern in _GRAMMARS:
        m = pattern.match(clause)
        if m is None:
            continue
        names = tuple(re.split(r",\s*", m["a"])) if "a" in pattern.groupindex else ()
        values = tuple(_WORDS.get(v, v) for v in re.split(r"/| or ", m["v"])) if "v" in pattern.groupindex else ()
        values = tuple(str(v) for v in values)
        if kind == "no_output":
            values = (str(int(values[0]) - 1),)  # the index of the rejected output
        return Limit(clause, kind, names, values)
    return None


def parse_notes(notes: str) -> tuple[tuple[Limit, ...], tuple[str, ...]]:
    """(limits, unparsed clauses) of one notes cell."""
    limits, unparsed = [], []
    for clause in notes.removeprefix("plugin:").split(";"):
        clause = clause.strip()
        if clause:
            lim = parse_clause(clause)
            (unparsed if lim is None else limits).append(clause if lim is None else lim)
    return tuple(limits), tuple(unparsed)
