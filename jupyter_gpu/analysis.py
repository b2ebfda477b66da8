"""Which names a cell reads from the namespace (push) and which it binds (pull).

Errs towards reading too much: pushing a name the cell did not need costs bytes (and
unchanged values are not sent twice), while missing one fails the cell remotely.
"""

from __future__ import annotations

import ast
import builtins
from dataclasses import dataclass, field

_BUILTINS = frozenset(dir(builtins)) | {"get_ipython", "display", "__file__"}


@dataclass
class CellNames:
    free: list[str] = field(default_factory=list)  # read before the cell binds them, in order
    bound: list[str] = field(default_factory=list)  # bound at module level, in order


class _Scope(ast.NodeVisitor):
    """Collects global reads and writes of one function/lambda/comprehension body."""

    def __init__(self) -> None:
        self.loads: list[str] = []
        self.stores: set[str] = set()
        self.globals: set[str] = set()
        self.nonlocals: set[str] = set()

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self.loads.append(node.id)
        else:
            self.stores.add(node.id)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.target, ast.Name):
            self.loads.append(node.target.id)  # x += 1 reads x first
        self.generic_visit(node)

    def visit_Global(self, node: ast.Global) -> None:
        self.globals.update(node.names)

    def visit_Nonlocal(self, node: ast.Nonlocal) -> None:
        self.nonlocals.update(node.names)

    def visit_arg(self, node: ast.arg) -> None:
        self.stores.add(node.arg)
        if node.annotation is not None:
            self.visit(node.annotation)

    def visit_alias(self, node: ast.alias) -> None:
        self.stores.add((node.asname or node.name).split(".")[0])

    def _nested(self, node: ast.AST, name: str | None) -> None:
        if name is not None:
            self.stores.add(name)
        inner = _scope_of(node)
        self.loads.extend(n for n in inner.global_reads())

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        for deco in node.decorator_list:
            self.visit(deco)
        self._nested(node, node.name)

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for expr in [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]:
            self.visit(expr)
        self._nested(node, node.name)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._nested(node, None)

    def _comprehension(self, node: ast.AST) -> None:
        generators: list[ast.comprehension] = getattr(node, "generators", [])
        self.visit(generators[0].iter)  # evaluated in the enclosing scope
        self._nested(node, None)

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _comprehension

    def global_reads(self) -> list[str]:
        local = (self.stores - self.globals) | self.nonlocals
        return [n for n in self.loads if n not in local]


def _scope_of(node: ast.AST) -> _Scope:
    scope = _Scope()
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
        args = node.args
        for default in [*args.defaults, *(d for d in args.kw_defaults if d is not None)]:
            scope.visit(default)  # defaults are read when the def runs: enclosing scope
        for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
            if arg is not None:
                scope.stores.add(arg.arg)
        body = node.body if isinstance(node.body, list) else [node.body]
        for stmt in body:
            scope.visit(stmt)
    elif isinstance(node, ast.ClassDef):
        for stmt in node.body:
            scope.visit(stmt)
    else:  # comprehension: targets are local; the first iterable was visited outside
        generators: list[ast.comprehension] = getattr(node, "generators", [])
        for i, gen in enumerate(generators):
            scope.visit(gen.target)
            if i:
                scope.visit(gen.iter)
            for cond in gen.ifs:
                scope.visit(cond)
        for attr in ("elt", "key", "value"):
            if hasattr(node, attr):
                scope.visit(getattr(node, attr))
        # a walrus inside a comprehension binds in the enclosing scope
        for sub in ast.walk(node):
            if isinstance(sub, ast.NamedExpr) and isinstance(sub.target, ast.Name):
                scope.globals.add(sub.target.id)
    return scope


def _global_writes(node: ast.AST) -> set[str]:
    """Names a function or class assigns through ``global`` declarations."""
    declared: set[str] = set()
    assigned: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Global):
            declared.update(sub.names)
        elif isinstance(sub, ast.Name) and not isinstance(sub.ctx, ast.Load):
            assigned.add(sub.id)
        elif isinstance(sub, ast.NamedExpr) and isinstance(sub.target, ast.Name):
            assigned.add(sub.target.id)
    return declared & assigned


def _stores_of(stmt: ast.AST, scope: _Scope) -> set[str]:
    stores = set(scope.stores)
    for sub in ast.walk(stmt):
        if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
            stores |= _global_writes(sub)
        if isinstance(sub, ast.NamedExpr) and isinstance(sub.target, ast.Name):
            stores.add(sub.target.id)
        if isinstance(sub, ast.ExceptHandler) and sub.name:
            stores.discard(sub.name)  # deleted again when the handler ends
    return stores


class _CellWalker:
    """Walks top-level statements in order, so a name bound before it is read is not free.

    Bindings inside a branch or loop count as bound for the rest of that block only: after
    an ``if`` the name may or may not exist, so a later read still pushes the local value.
    """

    def __init__(self) -> None:
        self.result = CellNames()
        self._free: set[str] = set()
        self._bound: set[str] = set()

    def read(self, names: list[str], bound: set[str]) -> None:
        for name in names:
            if name not in bound and name not in self._free and name not in _BUILTINS:
                self._free.add(name)
                self.result.free.append(name)

    def bind(self, names: set[str]) -> None:
        for name in sorted(names):
            if name not in self._bound:
                self._bound.add(name)
                self.result.bound.append(name)

    def expr(self, node: ast.AST | None, bound: set[str]) -> set[str]:
        if node is None:
            return set()
        scope = _Scope()
        scope.visit(node)
        self.read(scope.loads, bound)
        stores = _stores_of(node, scope)
        self.bind(stores)
        return stores

    def block(self, stmts: list[ast.stmt], bound: set[str]) -> None:
        for stmt in stmts:
            if isinstance(stmt, ast.For | ast.AsyncFor):
                self.expr(stmt.iter, bound)
                inner = bound | self.expr(stmt.target, bound)
                self.block(stmt.body, inner)
                self.block(stmt.orelse, set(bound))
            elif isinstance(stmt, ast.If | ast.While):
                bound |= self.expr(stmt.test, bound)
                self.block(stmt.body, set(bound))
                self.block(stmt.orelse, set(bound))
            elif isinstance(stmt, ast.With | ast.AsyncWith):
                for item in stmt.items:
                    self.expr(item.context_expr, bound)
                    bound |= self.expr(item.optional_vars, bound)
                self.block(stmt.body, bound)  # a with body runs unless entering raised
            elif isinstance(stmt, ast.Try | ast.TryStar):
                self.block(stmt.body, set(bound))
                for handler in stmt.handlers:
                    self.expr(handler.type, bound)
                    self.block(handler.body, bound | ({handler.name} if handler.name else set()))
                self.block(stmt.orelse, set(bound))
                self.block(stmt.finalbody, set(bound))
            else:
                bound |= self.expr(stmt, bound)


def analyse_cell(code: str) -> CellNames:
    """Free and bound names of a cell's code; raises SyntaxError as Python would."""
    walker = _CellWalker()
    walker.block(ast.parse(code).body, set())
    return walker.result
