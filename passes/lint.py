"""Kernel-coverage lint: would a runtime run every node of an artifact's graphs on the kernels its target promises?

A profile per target (``PROFILES``) is a set of rules over one graph walk; each rule reads data files in
``passes/rules/`` (never op names hard-coded here), so another back end (e.g. an Ascend profile with its own tables)
adds a profile and data, not code paths. The ``ascend`` profile (``passes/lint_ascend.py``, data in
``passes/rules/ascend/``, docs/ascend_rules.md) reads the graph as it is (CANN's parser inlines nothing) and adds
model-level rules (opset, opset_import, functions, graph inputs, static shapes, dtypes). The ORT profiles:

* walk the graph the way ONNX Runtime sees it: model-local functions inlined (ORT inlines the body of every node
  that has no kernel: the dsv4 ops), types inferred (onnx shape inference), main graph and every subgraph;
* ``kernel`` rule: the node's (domain, op) has a row in the EP's kernel table whose opset range holds the node's
  schema version (the version ORT resolves from the model's opset import) and whose type constraints admit the
  node's input and output types;
* ``exceptions``: documented cases where falling back to the CPU EP is what ORT does on purpose, each with its
  reason, in ``<target>_exceptions.tsv``.

A violation names the graph, the node (``(model)``, ``(input x)``, ... for model-level rules), its op, the rule and
the rule's source: ``file:line`` of the kernel row (or ``no row for op X in <file>``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx.inliner
import onnx.shape_inference

RULES = Path(__file__).parent / "rules"
_INDEX_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL)  # graph inputs fed from the host
SMALL = 100  # elements: ORT's kSmallInitializerThreshold (core/framework/fallback_cpu_capability.cc)


@dataclass(frozen=True)
class KernelRow:
    domain: str
    op: str
    since: int
    until: int | None
    constraints: dict[str, frozenset[str]]
    params: tuple[tuple[str, ...], tuple[str, ...]] | None
    where: str  # "file:line" of this row in the data file
    source_line: str  # the row's line in its own source (OperatorKernels.md or the registry)

    def covers(self, version: int) -> bool:
        return self.since <= version and (self.until is None or version <= self.until)

    def range(self) -> str:
        return f"{self.since}+" if self.until is None else f"[{self.since}, {self.until}]"


def _split(text: str, sep: str) -> list[tuple[str, str]]:
    return [tuple(p.split("=", 1)) for p in text.split(sep) if p]


def tsv_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, {column: cell}) of each row of a rule table: '#' comments and blank lines skipped, the first
    other line names the columns."""
    columns = None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("#") or not line.strip():
            continue
        cells = line.split("\t")
        if columns is None:
            columns = cells
            continue
        yield n, dict(zip(columns, cells))


def load_kernels(path: Path) -> dict[tuple[str, str], list[KernelRow]]:
    """(domain, op) -> rows of a table written by passes/rules/extract_kernels.py."""
    table: dict[tuple[str, str], list[KernelRow]] = defaultdict(list)
    for n, r in tsv_rows(path):
        params = None
        if r["params"]:
            p = dict(_split(r["params"], ";"))
            params = (tuple(p.get("in", "").split(",")), tuple(p.get("out", "").split(",")))
        table[(r["domain"], r["op"])].append(KernelRow(
            r["domain"], r["op"], int(r["since"]), int(r["until"]) if r["until"] else None,
            {k: frozenset(v.split(",")) for k, v in _split(r["constraints"], ";")}, params,
            f"{path.name}:{n}", r["source_line"]))
    return table


@dataclass(frozen=True)
class Exception_:
    op: str  # "domain::op" or "*"
    when: str  # a condition of CONDITIONS
    reason: str
    where: str


def load_exceptions(path: Path) -> list[Exception_]:
    out = []
    if not path.exists():
        return out
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("#") or not line.strip() or line.startswith("op\t"):
            continue
        op, when, reason = line.split("\t", 2)
        if when not in CONDITIONS:
            raise ValueError(f"{path.name}:{n}: unknown condition {when!r}; known: {', '.join(CONDITIONS)}")
        out.append(Exception_(op, when, reason, f"{path.name}:{n}"))
    return out


@dataclass(frozen=True)
class Violation:
    graph: str
    node: str
    op: str  # "domain::op"
    rule: str
    source: str

    def line(self) -> str:
        return f"{self.graph}\t{self.node}\t{self.op}\t{self.rule}\t{self.source}"


# ---- the graph as ORT sees it --------------------------------------------------------------------------------------
@dataclass
class Walk:
    """One graph after inlining and type inference: types and producers by value name, CPU-side values."""

    name: str
    model: onnx.ModelProto
    opsets: dict[str, int]
    types: dict[str, int] = field(default_factory=dict)
    small: set[str] = field(default_factory=set)  # small initializers / constants, integer graph inputs (CPU-side)
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)

    def nodes(self) -> Iterator[onnx.NodeProto]:
        def visit(graph: onnx.GraphProto):
            for v in (*graph.input, *graph.output, *graph.value_info):
                if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
                    self.types[v.name] = v.type.tensor_type.elem_type
            for t in graph.initializer:
                self.types[t.name] = t.data_type
                if _size(t.dims) <= SMALL:
                    self.small.add(t.name)
            self.small.update(i.name for i in graph.input if i.type.tensor_type.elem_type in _INDEX_TYPES)
            for node in graph.node:
                for o in node.output:
                    self.producer[o] = node
                if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                    t = next((a.t for a in node.attribute if a.name == "value"), None)
                    if t is None or _size(t.dims) <= SMALL:
                        self.small.update(node.output)
                yield node
                for a in node.attribute:
                    for sub in (a.g,) if a.HasField("g") else a.graphs:
                        yield from visit(sub)

        yield from visit(self.model.graph)


def _size(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def as_ort_sees_it(path: Path) -> onnx.ModelProto:
    """The graph file without its weights, model-local functions inlined, types inferred."""
    model = onnx.load(path, load_external_data=False)
    model = onnx.inliner.inline_local_functions(model)
    return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=False)


def type_name(elem: int) -> str:
    return onnx.TensorProto.DataType.Name(elem).lower()


def schema_version(node: onnx.NodeProto, opset: int) -> tuple[int, onnx.defs.OpSchema | None]:
    """The version ORT resolves for `node` (its schema's since_version at the model's opset) and the schema."""
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    try:
        s = onnx.defs.get_schema(node.op_type, opset, domain)
        return s.since_version, s
    except onnx.defs.SchemaError:
        return opset, None


# ---- rules ---------------------------------------------------------------------------------------------------------
# a rule returns None, one (rule text, source) or a list of them
Rule = Callable[["Walk", onnx.NodeProto, "Profile"], "tuple[str, str] | list[tuple[str, str]] | None"]


def formal_types(node: onnx.NodeProto, schema, row: KernelRow) -> list[tuple[str, str]]:
    """(value name, formal type string) per input and output, from the onnx schema or the row's params."""
    if schema is not None:
        ins = [f.type_str for f in schema.inputs]
        outs = [f.type_str for f in schema.outputs]
    elif row.params is not None:
        ins, outs = row.params
    else:
        return []
    pairs = []
    for names, formals in ((node.input, ins), (node.output, outs)):
        for i, name in enumerate(names):
            if name and formals:
                pairs.append((name, formals[min(i, len(formals) - 1)]))
    return pairs


def kernel_rule(walk: Walk, node: onnx.NodeProto, prof: Profile):
    """None when a kernel row covers the node; else (rule violated, its source)."""
    domain = node.domain or "ai.onnx"
    opset = walk.opsets.get(node.domain or "", walk.opsets.get(domain, 1))
    version, schema = schema_version(node, opset)
    rows = prof.kernels.get((domain, node.op_type))
    if not rows:
        return f"no kernel for {domain}::{node.op_type}", f"no row for op {node.op_type} in {prof.table.name}"
    row = next((r for r in rows if r.covers(version)), None)
    if row is None:
        have = ", ".join(r.range() for r in rows)
        return (f"opset: {domain}::{node.op_type} resolves to version {version} (opset {opset}); kernels: {have}",
                rows[0].where)
    for name, formal in formal_types(node, schema, row):
        allowed = row.constraints.get(formal)
        elem = walk.types.get(name)
        if allowed is None or elem is None:
            continue  # a formal the kernel does not constrain, or a type inference could not tell
        if type_name(elem) not in allowed:
            return (f"type: {name} is {type_name(elem)}, {formal} of {node.op_type}-{row.range()} allows "
                    f"{','.join(sorted(allowed))}", f"{row.where} (source line {row.source_line})")
    return None


def cpu_shape_subgraph(walk: Walk, node: onnx.NodeProto, prof: Profile) -> bool:
    """Every input (at least one) is a small initializer / Constant, an integer graph input, a Shape/Size output or
    another such node's output: ORT keeps such a node on the CPU EP (GetCpuPreferredNodes), so a missing device kernel copies no large tensor."""
    seen: dict[str, bool] = prof.cache.setdefault(walk.name, {})

    def cpu(value: str, depth: int = 0) -> bool:
        if not value or value in walk.small:
            return True
        if value in seen:
            return seen[value]
        p = walk.producer.get(value)
        ok = p is not None and depth < 64 and (
            p.op_type in ("Shape", "Size") or all(cpu(i, depth + 1) for i in p.input))
        seen[value] = ok
        return ok

    return any(node.input) and all(cpu(i) for i in node.input)


def onnx_function(walk: Walk, node: onnx.NodeProto, prof: Profile) -> bool:
    """The op's ONNX schema defines a function body: ORT expands such a node into it when no kernel is registered."""
    opset = walk.opsets.get(node.domain or "", 1)
    s = schema_version(node, opset)[1]
    return s is not None and (s.has_function or s.has_context_dependent_function)


CONDITIONS: dict[str, Callable[[Walk, onnx.NodeProto, Profile], bool]] = {
    "cpu_shape_subgraph": cpu_shape_subgraph,
    "onnx_function": onnx_function,
    "always": lambda *_: True,
}


@dataclass
class Profile:
    name: str
    table: Path
    exceptions_file: Path
    rules: tuple[tuple[str, Rule], ...]
    kernels: dict = field(default_factory=dict)
    exceptions: list[Exception_] = field(default_factory=list)
    cache: dict = field(default_factory=dict)

    def load(self) -> Profile:
        self.kernels, self.exceptions = load_kernels(self.table), load_exceptions(self.exceptions_file)
        return self

    def prepare(self, path: Path) -> onnx.ModelProto:
        """The graph file the way this profile's runtime reads it."""
        return as_ort_sees_it(path)

    def walk(self, graph: str, model: onnx.ModelProto) -> Walk:
        return Walk(graph, model, {o.domain or "": o.version for o in model.opset_import})

    def check_model(self, walk: Walk, report: Report) -> None:
        """Model-level rules (none for the ORT profiles): append their violations and notes to `report`."""

    def excepted(self, walk: Walk, node: onnx.NodeProto) -> Exception_ | None:
        op = f"{node.domain or 'ai.onnx'}::{node.op_type}"
        return next((e for e in self.exceptions if e.op in ("*", op) and CONDITIONS[e.when](walk, node, self)), None)


def _ascend() -> Profile:
    from dsv4.passes.lint_ascend import profile  # imports this module, hence loaded on demand

    return profile()


PROFILES: dict[str, Callable[[], Profile]] = {
    "ort-cuda": lambda: Profile("ort-cuda", RULES / "ort_cuda_kernels.tsv", RULES / "ort_cuda_exceptions.tsv",
                                (("kernel", kernel_rule),)).load(),
    "ort-cpu": lambda: Profile("ort-cpu", RULES / "ort_cpu_kernels.tsv", RULES / "ort_cpu_exceptions.tsv",
                               (("kernel", kernel_rule),)).load(),
    "ascend": _ascend,
}


@dataclass
class Report:
    target: str
    violations: list[Violation]
    excepted: dict[str, int]  # "where: op" -> nodes excused by that exception row
    nodes: dict[str, int]  # graph -> nodes checked
    info: list[str] = field(default_factory=list)  # notes that are not violations (e.g. shapes inference left unknown)


def lint_model(model: onnx.ModelProto, graph: str, prof: Profile, report: Report) -> None:
    walk = prof.walk(graph, model)
    prof.check_model(walk, report)
    checked = 0
    for node in walk.nodes():
        checked += 1
        for _, rule in prof.rules:
            hits = rule(walk, node, prof)
            for rule_text, source in [hits] if isinstance(hits, tuple) else hits or ():
                exc = prof.excepted(walk, node)
                if exc is not None:
                    key = f"{exc.where} {exc.op} ({exc.when})"
                    report.excepted[key] = report.excepted.get(key, 0) + 1
                    continue
                report.violations.append(Violation(graph, node.name or "(unnamed)",
                                                   f"{node.domain or 'ai.onnx'}::{node.op_type}", rule_text, source))
    report.nodes[graph] = checked


def lint_artifact(art: str | Path, target: str | None = None, verify: bool = True) -> Report:
    """Lint every graph the manifest lists (prefill, decode, or one prefill per static bucket) against `target`'s
    profile (default: the manifest's target)."""
    from dsv4.export.artifact import load_manifest

    art = Path(art)
    man = load_manifest(art, verify=verify, schema=False)  # the graphs are what is linted
    target = target or man["target"]
    if target not in PROFILES:
        raise ValueError(f"lint: no profile for target {target!r}; profiles: {', '.join(PROFILES)}")
    prof = PROFILES[target]()
    report = Report(target, [], {}, {})
    for g, info in man["graphs"].items():
        lint_model(prof.prepare(art / info["file"]), g, prof, report)
    return report
