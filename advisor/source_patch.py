"""Source rewrites with libcst, so the user's formatting and comments survive.

Two kinds, both declared by the patterns (kernels/registry.py):
  - class swaps: `LlamaRMSNorm(hidden, eps)` -> `RMSNorm(hidden, eps)` where the fused module is
    constructor-compatible (`FusionPattern.modules` + `module_import`);
  - expression rewrites: `F.silu(gate) * up` -> `swiglu(gate, up)` (`FusionPattern.rewrites`),
    applied only inside the function the cluster was traced in (its `def` line).
Imports the new code needs are added once, after the file's own imports.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import libcst as cst
from libcst.codemod import CodemodContext
from libcst.codemod.visitors import AddImportsVisitor
from libcst.metadata import MetadataWrapper, PositionProvider

from fusion_advisor.kernels.registry import Rewrite

_FUNCTIONAL_PREFIXES = ("F", "torch.nn.functional", "nn.functional", "functional")
_COMMUTATIVE = (cst.Multiply, cst.Add)


def _dotted(node: cst.CSTNode) -> str | None:
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr.value}" if base else None
    return None


def _names_equal(template: str, candidate: str) -> bool:
    if template == candidate:
        return True
    if template.startswith("F."):
        fn = template[2:]
        return candidate == fn or any(candidate == f"{p}.{fn}" for p in _FUNCTIONAL_PREFIXES)
    return False


def _code(node: cst.CSTNode) -> str:
    return cst.Module(body=[]).code_for_node(node)


class _Matcher:
    """Structural match of a template expression against a candidate, binding `$x` placeholders."""

    def __init__(self, template: cst.BaseExpression):
        self.template = template

    def match(self, node: cst.CSTNode) -> dict[str, cst.BaseExpression] | None:
        binds: dict[str, cst.BaseExpression] = {}
        return binds if self._m(self.template, node, binds) else None

    def _m(self, t, n, binds) -> bool:
        if isinstance(t, cst.Name) and t.value.startswith("__ph_"):
            key = t.value[5:]
            if key in binds:
                return _code(binds[key]).strip() == _code(n).strip()
            if not isinstance(n, cst.BaseExpression):
                return False
            binds[key] = n
            return True
        td, nd = _dotted(t), _dotted(n)
        if td is not None:
            return nd is not None and _names_equal(td, nd)
        if type(t) is not type(n):
            return False
        if isinstance(t, cst.BinaryOperation):
            if type(t.operator) is not type(n.operator):
                return False
            saved = dict(binds)
            if self._m(t.left, n.left, binds) and self._m(t.right, n.right, binds):
                return True
            binds.clear()
            binds.update(saved)
            if isinstance(t.operator, _COMMUTATIVE):
                return self._m(t.left, n.right, binds) and self._m(t.right, n.left, binds)
            return False
        if isinstance(t, cst.Call):
            if not self._m(t.func, n.func, binds) or len(t.args) != len(n.args):
                return False
            for ta, na in zip(t.args, n.args):
                tk = ta.keyword.value if ta.keyword else None
                nk = na.keyword.value if na.keyword else None
                if tk != nk or ta.star != na.star or not self._m(ta.value, na.value, binds):
                    return False
            return True
        if isinstance(t, cst.UnaryOperation):
            return type(t.operator) is type(n.operator) and self._m(t.expression, n.expression, binds)
        if isinstance(t, (cst.Integer, cst.Float, cst.SimpleString)):
            return t.value == n.value
        return _code(t).strip() == _code(n).strip()


def _parse_template(text: str) -> cst.BaseExpression:
    return cst.parse_expression(text.replace("$", "__ph_"))


class _Substitute(cst.CSTTransformer):
    def __init__(self, binds):
        self.binds = binds

    def leave_Name(self, original, updated):
        if updated.value.startswith("__ph_"):
            return self.binds[updated.value[5:]]
        return updated


@dataclass
class Change:
    line: int
    before: str
    after: str
    why: str


@dataclass
class _RewriteSpec:
    rewrite: Rewrite
    matcher: _Matcher
    replacement: cst.BaseExpression
    def_lines: set[int]        # only inside the innermost function holding one of these traced lines
                               # (a def line, or the line a frame was on when recording began)
    why: str


class _Transformer(cst.CSTTransformer):
    METADATA_DEPENDENCIES = (PositionProvider,)

    def __init__(self, class_swaps: dict[str, tuple[str, str]], rewrites: list[_RewriteSpec],
                 replacements: list[StatementReplacement] = ()):
        super().__init__()
        self.class_swaps = class_swaps      # old class name -> (new name, why)
        self.rewrites = rewrites
        self.replacements = list(replacements)
        self.functions: list[tuple[int, int]] = []  # (first, last) lines of the enclosing functions
        self.changes: list[Change] = []
        self.imports: list[str] = []

    def visit_FunctionDef(self, node):
        pos = self.get_metadata(PositionProvider, node)
        self.functions.append((pos.start.line, pos.end.line))

    def leave_FunctionDef(self, original, updated):
        self.functions.pop()
        for r in self.replacements:
            updated = self._replace_statements(original, updated, r)
        return updated

    def _replace_statements(self, original, updated, r: "StatementReplacement"):
        """Statements first..last of this function's own body become r.code, when exactly those
        statements span those lines."""
        lines = [(self.get_metadata(PositionProvider, st).start.line, self.get_metadata(PositionProvider, st).end.line)
                 for st in original.body.body]
        inside = [i for i, (a, b) in enumerate(lines) if a >= r.first_line and b <= r.last_line]
        if not inside or lines[inside[0]][0] != r.first_line or lines[inside[-1]][1] != r.last_line:
            return updated
        old = list(updated.body.body)
        first = old[inside[0]]
        new = cst.parse_statement(r.code).with_changes(leading_lines=first.leading_lines)
        self.changes.append(Change(r.first_line, "\n".join(_code(old[i]).strip() for i in inside), r.code.strip(), r.why))
        self.imports.extend(r.imports)
        body = old[:inside[0]] + [new] + old[inside[-1] + 1:]
        return updated.with_changes(body=updated.body.with_changes(body=body))

    def _line(self, node) -> int:
        return self.get_metadata(PositionProvider, node).start.line

    def leave_Call(self, original, updated):
        name = _dotted(updated.func)
        if name is not None:
            leaf = name.rsplit(".", 1)[-1]
            if leaf in self.class_swaps:
                new_name, why = self.class_swaps[leaf]
                new = updated.with_changes(func=cst.Name(new_name))
                self.changes.append(Change(self._line(original), _code(original), _code(new), why))
                return new
        return self._try_rewrites(original, updated)

    def leave_BinaryOperation(self, original, updated):
        return self._try_rewrites(original, updated)

    def _try_rewrites(self, original, updated):
        for spec in self.rewrites:
            if spec.def_lines and not (self.functions and any(self.functions[-1][0] <= line <= self.functions[-1][1]
                                                             for line in spec.def_lines)):
                continue
            binds = spec.matcher.match(updated)
            if binds is None:
                continue
            new = spec.replacement.visit(_Substitute(binds))
            new = new.with_changes(lpar=updated.lpar, rpar=updated.rpar)
            self.changes.append(Change(self._line(original), _code(original), _code(new), spec.why))
            self.imports.extend(spec.rewrite.imports)
            return new
        return updated


@dataclass
class StatementReplacement:
    """Replace the statements on lines first..last of one function's body by `code` (one statement,
    e.g. `return fused_g_1a2b(y, bias, s0=scale)`), adding `imports`."""

    first_line: int
    last_line: int
    code: str
    imports: tuple[str, ...]
    why: str
    pattern: str = ""        # the generated pattern it calls ("generic:<hash>")


@dataclass
class FileRewrite:
    path: str
    before: str
    after: str
    changes: list[Change] = field(default_factory=list)
    created: bool = False      # a new file (a generated kernel): --revert deletes it


def new_file(path: str, text: str, why: str, replace: bool = False) -> FileRewrite:
    """A file apply creates (or, `replace`, overwrites with a newer generated version)."""
    before = open(path, encoding="utf-8").read() if replace else ""
    return FileRewrite(path, before, text, [Change(1, "", f"({len(text.splitlines())} lines)", why)], created=not replace)


def _alias(name: str) -> str:
    return name if name.startswith("Fused") else f"Fused{name}"


def rewrite_source(path: str, text: str, class_swaps: dict[str, tuple[str, str, str]],
                   rewrites: list[tuple[Rewrite, set[int], str]],
                   replacements: list[StatementReplacement] = ()) -> FileRewrite:
    """Apply class swaps {old_name: (module, new_name, why)}, rewrites [(Rewrite, def_lines, why)]
    and statement replacements."""
    module = cst.parse_module(text)
    specs = [_RewriteSpec(r, _Matcher(_parse_template(r.match)), _parse_template(r.replace), lines, why)
             for r, lines, why in rewrites]
    # Imported under an alias: the user's file may define a class of the same name.
    swaps = {old: (_alias(new), why) for old, (_, new, why) in class_swaps.items()}
    transformer = _Transformer(swaps, specs, replacements)
    new_module = MetadataWrapper(module).visit(transformer)
    if transformer.changes:
        context = CodemodContext()
        used = {old for old in class_swaps if any(c.why == class_swaps[old][2] for c in transformer.changes)}
        for old in used:
            mod, new, _ = class_swaps[old]
            AddImportsVisitor.add_needed_import(context, mod, new, _alias(new))
        for line in dict.fromkeys(transformer.imports):
            stmt = cst.parse_statement(line).body[0]
            if isinstance(stmt, cst.ImportFrom):
                for alias in stmt.names:
                    AddImportsVisitor.add_needed_import(
                        context, _code(stmt.module) if stmt.module else None, alias.name.value,
                        alias.asname.name.value if alias.asname else None, relative=len(stmt.relative))
            elif isinstance(stmt, cst.Import):
                for alias in stmt.names:
                    AddImportsVisitor.add_needed_import(context, _code(alias.name))
        new_module = AddImportsVisitor(context).transform_module(new_module)
    return FileRewrite(path, text, new_module.code, transformer.changes)
