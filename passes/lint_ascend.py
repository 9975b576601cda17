"""The ``ascend`` lint profile: an ONNX graph against the two Ascend gates, CANN's ONNX parser (ATC, and ONNX Runtime's
CANN EP in graph mode, which hands its subgraphs to that parser) and the CANN EP's graph-mode op list.

The rules read unmodified copies of the research data in ``passes/rules/ascend/`` (``sources.tsv`` records their
hashes): ``atc_onnx_ops.tsv`` (parser registrations, exact opset sets, parse-time limits in its notes),
``cann_ep_graph_ops.txt`` (graph-mode allow-list) and ``NOTES.md`` (structural rules, element types, chip dtypes).
Every violation cites ``file:line`` of the row, or of the NOTES.md line it enforces (found by its text).

The graph is read as it is (CANN's parser inlines nothing), with types and shapes from onnx shape inference.
Model-level rules report the node as ``(model)``, ``(input x)``, ``(output y)`` or ``(initializer w)``, op ``-``.
docs/ascend_rules.md lists the rules, their sources and what is not checked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx.shape_inference

from dsv4.passes.ascend_limits import Limit, parse_notes, type_names
from dsv4.passes.lint import RULES, Profile, Report, Violation, Walk, tsv_rows

ASCEND = RULES / "ascend"
PARSER_TABLE = ASCEND / "atc_onnx_ops.tsv"
GRAPH_OPS = ASCEND / "cann_ep_graph_ops.txt"
NOTES = ASCEND / "NOTES.md"
# Policy of the ascend target (issue 12; ../shared/DESIGN.md targets table), not a CANN rule: ai.onnx opset <= 17
# (stricter than the parser's <= 18, read from NOTES.md), and the chips it must run on (NOTES.md section 3 rules that
# name any of them apply).
OPSET_CEILING = 17
CHIPS = ("A2", "A3", "310P")
_FAMILIES = {"FP8": "float8", "FP4": "float4", "BF16": "bfloat16", "HiF8": None}  # NOTES' names -> onnx type prefix
_DEFAULT = ("", "ai.onnx")


def cite(path: Path, text: str) -> tuple[str, int]:
    """(``file:line``, 0-based index) of the first line of `path` containing `text`; LookupError if none does."""
    for i, line in enumerate(path.read_text().splitlines()):
        if text in line:
            return f"{path.name}:{i + 1}", i
    raise LookupError(f"{path.name}: no line contains {text!r} (the rule's source moved; update lint_ascend.py)")


def parse_versions(text: str) -> frozenset[int] | None:
    """'8-18', '11,16-18', '1' -> the opsets; 'any' -> None (every opset); 'unknown' -> none."""
    if text == "any":
        return None
    if text == "unknown":
        return frozenset()
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(out)


@dataclass(frozen=True)
class ParserRow:
    domain: str
    op: str
    opsets: frozenset[int] | None  # None: every opset (Constant)
    text: str  # the opset_versions cell
    limits: tuple[Limit, ...]
    unparsed: tuple[str, ...]  # note clauses no grammar reads (docs/ascend_rules.md)
    where: str


def load_parser_table(path: Path = PARSER_TABLE) -> dict[tuple[str, str], ParserRow]:
    table = {}
    for n, r in tsv_rows(path):
        limits, unparsed = parse_notes(r["notes"])
        table[(r["domain"], r["op_type"])] = ParserRow(r["domain"], r["op_type"], parse_versions(r["opset_versions"]),
                                                       r["opset_versions"], limits, unparsed, f"{path.name}:{n}")
    return table


def load_graph_ops(path: Path = GRAPH_OPS) -> set[str]:
    return {s for line in path.read_text().splitlines() if (s := line.strip()) and not s.startswith("#")}


def load_dtypes(path: Path = NOTES) -> tuple[set[str], dict[str, tuple[str, str]]]:
    """(the parser's element types, {forbidden onnx type prefix: (reason, NOTES line)}) from NOTES.md section 3."""
    lines = path.read_text().splitlines()
    _, i = cite(path, "CANN ONNX parser element types")
    text = lines[i]
    for line in lines[i + 1:]:
        if line.lstrip().startswith("-") or not line.strip():
            break
        text += " " + line.strip()
    names = text.split("):", 1)[1].split(";", 1)[0]
    parser = {n.strip() for n in names.split(",")}
    where, i = cite(path, "Lint rule that follows:")
    forbidden = {}
    for m in re.finditer(r"no ([\w/]+)(?: tensors)? for ([\w/]+)", lines[i]):
        if not set(m[2].split("/")) & set(CHIPS):
            continue
        for fam in m[1].split("/"):
            if fam not in _FAMILIES:
                raise ValueError(f"{where}: unknown dtype family {fam!r}; known: {', '.join(_FAMILIES)}")
            if _FAMILIES[fam]:
                forbidden[_FAMILIES[fam]] = (f"no {fam} on {m[2]}", where)
    return parser, forbidden


# ---- the graph as CANN's parser sees it ----------------------------------------------------------------------------
def as_parser_sees_it(path: Path) -> onnx.ModelProto:
    """The graph file without its weights, nothing inlined, types and shapes inferred."""
    model = onnx.load(path, load_external_data=False)
    return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)


_INVENTED = re.compile(r"unk__\d+$")  # onnx shape inference's name for a dim it could not tell: unknown, not symbolic


def _dims(t: onnx.TypeProto) -> list | None:
    """[int | str (symbolic) | None (unknown)] of a tensor type; None when it has no shape."""
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else
            (d.dim_param if d.dim_param and not _INVENTED.match(d.dim_param) else None) for d in t.tensor_type.shape.dim]


def _graphs(g: onnx.GraphProto):
    yield g
    for node in g.node:
        for a in node.attribute:
            for sub in (a.g,) if a.HasField("g") else a.graphs:
                yield from _graphs(sub)


@dataclass
class AscendWalk(Walk):
    shapes: dict[str, list | None] = field(default_factory=dict)  # value -> dims, for every typed value
    elems: dict[str, int] = field(default_factory=dict)  # value -> element type
    outputs: set[str] = field(default_factory=set)  # the main graph's outputs (checked at model level)

    def __post_init__(self):
        self.outputs = {o.name for o in self.model.graph.output}
        for g in _graphs(self.model.graph):
            for v in (*g.input, *g.output, *g.value_info):
                self.shapes[v.name] = _dims(v.type)
                if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
                    self.elems[v.name] = v.type.tensor_type.elem_type
            for t in g.initializer:
                self.shapes[t.name], self.elems[t.name] = list(t.dims), t.data_type

    def opset(self) -> int | None:
        return self.opsets.get("", self.opsets.get("ai.onnx"))


def _fmt(dims: list | None) -> str:
    return "?" if dims is None else "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


# ---- per-node rules ------------------------------------------------------------------------------------------------
def domain_rule(walk: AscendWalk, node: onnx.NodeProto, prof: AscendProfile):
    if node.domain not in _DEFAULT:
        return f"domain: custom domain {node.domain!r} (no CANN plugin; graph mode takes the default domain)", \
            prof.cites["domain"]
    return None


def parser_rule(walk: AscendWalk, node: onnx.NodeProto, prof: AscendProfile):
    opset = walk.opset()
    if node.domain not in _DEFAULT or opset is None:
        return None  # the domain / opset rules name it
    row = prof.parser.get(("ai.onnx", node.op_type))
    if row is None:
        return (f"parser: no CANN ONNX parser registration for ai.onnx::{node.op_type} (E16002)",
                f"{prof.cites['parser']}: no row for op {node.op_type}")
    if row.opsets is not None and opset not in row.opsets:
        return f"parser: ai.onnx::{node.op_type} is registered for opsets {row.text}, the model's is {opset}", row.where
    return None


def cann_graph_rule(walk: AscendWalk, node: onnx.NodeProto, prof: AscendProfile):
    if node.domain in _DEFAULT and node.op_type not in prof.graph_ops:
        return (f"cann_graph: {node.op_type} is not in ORT's CANN EP graph-mode list",
                f"{prof.cites['cann_graph']}: no line for op {node.op_type}")
    return None


def attribute_rule(walk: AscendWalk, node: onnx.NodeProto, prof: AscendProfile):
    row = prof.parser.get(("ai.onnx", node.op_type)) if node.domain in _DEFAULT else None
    if row is None or not row.limits:
        return None
    try:
        schema = onnx.defs.get_schema(node.op_type, walk.opset() or 1, "")
    except onnx.defs.SchemaError:
        schema = None
    return [(f"attribute: {got}; the parser's limit: {lim.clause!r}", row.where)
            for lim in row.limits if (got := lim.check(node, schema)) is not None]


def zero_dim_rule(walk: AscendWalk, node: onnx.NodeProto, prof: AscendProfile):
    if node.domain in _DEFAULT and node.op_type == "Constant":
        return None
    zero = [f"{v} {_fmt(d)}" for v in (*node.input, *node.output) if v and (d := walk.shapes.get(v)) and 0 in d]
    return (f"zero_dim: {', '.join(zero)}", prof.cites["zero_dim"]) if zero else None


def dynamic_dim_rule(walk: AscendWalk, node: onnx.NodeProto, prof: AscendProfile):
    sym = [f"{v} {_fmt(d)}" for v in node.output
           if v not in walk.outputs and (d := walk.shapes.get(v)) and any(isinstance(x, str) for x in d)]
    return (f"dynamic_dim: symbolic dims in {', '.join(sym)}", prof.cites["dynamic_dim"]) if sym else None


def dtype_rule(walk: AscendWalk, node: onnx.NodeProto, prof: AscendProfile):
    return [h for v in node.output if v in walk.elems and (h := prof.dtype_hit(v, walk.elems[v]))]


# ---- the profile ---------------------------------------------------------------------------------------------------
_CITES = {  # rule -> (file, the text of the line that states it)
    "opset": (NOTES, "model ai.onnx opset must be ≤"),
    "opset_floor": (NOTES, "the model's ai.onnx opset must be ≥"),
    "opset_import": (NOTES, "**Single opset_import**"),
    "domain": (NOTES, "node domain must be the default ONNX domain"),
    "function": (NOTES, "for each node it forms"),
    "no_input": (NOTES, "must have at least one input"),
    "dynamic_dim": (NOTES, "Input dims with `dim_param` or no value"),
    "zero_dim": (NOTES, "every operator except Const must have dim"),
    "dtype": (NOTES, "CANN ONNX parser element types"),
    "parser": (PARSER_TABLE, "Unmatched key -> error E16002"),
    "cann_graph": (GRAPH_OPS, "the fixed allow-list inside SupportONNXModel()"),
}


@dataclass
class AscendProfile(Profile):
    parser: dict = field(default_factory=dict)
    graph_ops: set = field(default_factory=set)
    cites: dict = field(default_factory=dict)
    parser_types: set = field(default_factory=set)
    forbidden: dict = field(default_factory=dict)
    opset_range: tuple[int, int] = (0, 0)  # (NOTES' floor, min(NOTES' parser ceiling, OPSET_CEILING))
    parser_ceiling: int = 0  # NOTES section 4.1

    def load(self) -> AscendProfile:
        self.parser, self.graph_ops = load_parser_table(), load_graph_ops()
        self.cites = {rule: cite(path, text)[0] for rule, (path, text) in _CITES.items()}
        self.parser_types, self.forbidden = load_dtypes()
        lines = NOTES.read_text().splitlines()
        floor = re.search(r"opset must be ≥ (\d+)", lines[cite(*_CITES["opset_floor"])[1]])
        ceiling = re.search(r"opset must be ≤ (\d+)", lines[cite(*_CITES["opset"])[1]])
        self.parser_ceiling = int(ceiling[1])
        self.opset_range = (int(floor[1]), min(self.parser_ceiling, OPSET_CEILING))
        return self

    def prepare(self, path: Path) -> onnx.ModelProto:
        return as_parser_sees_it(path)

    def walk(self, graph: str, model: onnx.ModelProto) -> AscendWalk:
        return AscendWalk(graph, model, {o.domain or "": o.version for o in model.opset_import})

    def dtype_hit(self, value: str, elem: int) -> tuple[str, str] | None:
        names = type_names(elem)
        why = [] if names & self.parser_types else [("not a CANN ONNX parser element type", self.cites["dtype"])]
        why += [r for prefix, r in self.forbidden.items() if any(n.startswith(prefix) for n in names)]
        if not why:
            return None
        name = onnx.TensorProto.DataType.Name(elem).lower()
        return f"dtype: {value} is {name} ({'; '.join(w for w, _ in why)})", ", ".join(dict.fromkeys(s for _, s in why))

    def check_model(self, walk: AscendWalk, report: Report) -> None:
        model, g = walk.model, walk.model.graph
        out: list[tuple[str, str, str]] = []  # (node column, rule text, source)
        imports = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
        if len(model.opset_import) != 1 or model.opset_import[0].domain not in _DEFAULT:
            out.append(("(model)", f"opset_import: {len(model.opset_import)} entries ({imports}); CANN's parser takes "
                        "exactly one, ai.onnx (E16005)", self.cites["opset_import"]))
        opset, (lo, hi) = walk.opset(), self.opset_range
        if opset is None or not lo <= opset <= hi:
            out.append(("(model)", f"opset: model ai.onnx opset {opset} outside {lo}..{hi} (the ascend target's "
                        f"ceiling {OPSET_CEILING}; CANN's parser: {lo}..{self.parser_ceiling})",
                        self.cites["opset_floor" if opset is not None and opset < lo else "opset"]))
        for f in model.functions:
            out.append(("(model)", f"function: model-local function {f.domain}::{f.name} (CANN's parser inlines "
                        "nothing: each node is looked up as <domain>::<opset>::<op>)", self.cites["function"]))
        consts = {t.name for t in g.initializer}
        if not [i for i in g.input if i.name not in consts]:
            out.append(("(model)", "no_input: the graph has no input that is not an initializer (E16001)",
                        self.cites["no_input"]))
        for kind, values in (("input", [i for i in g.input if i.name not in consts]), ("output", g.output)):
            for v in values:
                dims = walk.shapes.get(v.name)
                if dims is None or any(d is None or isinstance(d, str) for d in dims):
                    out.append((f"({kind} {v.name})", f"dynamic_dim: {kind} {v.name} is {_fmt(dims)}, not static",
                                self.cites["dynamic_dim"]))
                if kind == "output":
                    continue  # zero dims and dtypes of what a node produces: at that node
                if dims and 0 in dims:
                    out.append((f"({kind} {v.name})", f"zero_dim: {kind} {v.name} is {_fmt(dims)}",
                                self.cites["zero_dim"]))
                if (hit := v.name in walk.elems and self.dtype_hit(v.name, walk.elems[v.name])):
                    out.append((f"({kind} {v.name})", *hit))
        for sub in _graphs(g):
            for t in sub.initializer:
                if hit := self.dtype_hit(t.name, t.data_type):
                    out.append((f"(initializer {t.name})", *hit))
        report.violations += [Violation(walk.name, node, "-", text, src) for node, text, src in out]
        produced = [v for sub in _graphs(g) for n in sub.node for v in n.output if v]
        unknown = sum(1 for v in produced if (d := walk.shapes.get(v)) is None or None in d)
        if unknown:
            report.info.append(f"{walk.name}: shape inference left {unknown} of {len(produced)} node outputs "
                               "(partly) unknown; those dims are not checked for dynamic_dim / zero_dim")


RULE_FUNCS = (("domain", domain_rule), ("parser", parser_rule), ("cann_graph", cann_graph_rule),
              ("attribute", attribute_rule), ("zero_dim", zero_dim_rule), ("dynamic_dim", dynamic_dim_rule),
              ("dtype", dtype_rule))


def profile() -> AscendProfile:
    return AscendProfile("ascend", PARSER_TABLE, ASCEND / "ascend_exceptions.tsv", RULE_FUNCS).load()
