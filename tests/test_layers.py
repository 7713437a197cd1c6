"""The layering of DESIGN.md, checked on the source (S3QL's check_imports.py idea):

    tools/  ->  provider/  ->  nbd/  ->  fuse_mount/  ->  blockstore/

- a package imports only itself and the packages below it (never upward);
- pyfuse3 is imported in fuse_mount/ alone, trio never in blockstore/;
- no cycle among module-level imports (imports inside functions are a deliberate
  late binding and are not counted);
- no access to another package's private names: `x._name` where `_name` is defined
  only in another of our packages (a method or attribute assigned there) is reaching
  through a layer's API.
An AST walk, no import: well under a second, and each finding says file:line.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["blockstore", "fuse_mount", "nbd", "provider", "tools"]   # bottom first
ONLY_IN = {"pyfuse3": {"fuse_mount"}}
NEVER_IN = {"trio": {"blockstore"}}


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for pkg in LAYERS:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            name = name.removesuffix(".__init__")
            out[name] = (path, ast.parse(path.read_text(), str(path)))
    return out


MODULES = _modules()


def _imports(name: str, path: Path, tree: ast.Module) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) of every import in a module."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(n) for n in tree.body}
    for n in tree.body:   # imports under `if TYPE_CHECKING:` / try at the top count too
        if isinstance(n, ast.If | ast.Try):
            top_level.update(id(x) for x in ast.walk(n))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = pkg.split(".")
                base = parts[:len(parts) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                full = f"{mod}.{a.name}"
                out.append((full if full in MODULES else mod, node.lineno,
                            id(node) in top_level))
    return out


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Line numbers of imports under `if TYPE_CHECKING:` (no runtime edge)."""
    lines = set()
    for n in tree.body:
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
            lines.update(x.lineno for x in ast.walk(n) if hasattr(x, "lineno"))
    return lines


def test_no_upward_imports_and_third_party_rules():
    rank = {p: i for i, p in enumerate(LAYERS)}
    bad = []
    for name, (path, tree) in MODULES.items():
        here = name.split(".")[0]
        for mod, line, _ in _imports(name, path, tree):
            top = mod.split(".")[0]
            where = f"{path.relative_to(ROOT)}:{line} imports {mod}"
            if top in rank and rank[top] > rank[here]:
                bad.append(f"{where} (upward: {here} is below {top})")
            if top in ONLY_IN and here not in ONLY_IN[top]:
                bad.append(f"{where} (only {', '.join(sorted(ONLY_IN[top]))} may)")
            if top in NEVER_IN and here in NEVER_IN[top]:
                bad.append(f"{where} ({here} must not)")
    assert bad == []


def test_no_import_cycles():
    graph: dict[str, set[str]] = defaultdict(set)
    for name, (path, tree) in MODULES.items():
        typing_only = _type_checking_only(tree)
        for mod, line, top_level in _imports(name, path, tree):
            if top_level and mod in MODULES and mod != name and line not in typing_only:
                graph[name].add(mod)
    # Tarjan's strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))
    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    assert cycles == []


def _private_definitions() -> dict[str, set[str]]:
    """_name -> the packages that define it (def, class, self._name = ..., x._name = ...
    at a definition, dataclass fields)."""
    defined: dict[str, set[str]] = defaultdict(set)
    for name, (_path, tree) in MODULES.items():
        pkg = name.split(".")[0]
        for node in ast.walk(tree):
            n = None
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                n = node.name
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                n = node.attr
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                n = node.target.id
            if n and n.startswith("_") and not n.startswith("__"):
                defined[n].add(pkg)
    return defined


def test_no_private_access_across_packages():
    defined = _private_definitions()
    bad = []
    for name, (path, tree) in MODULES.items():
        pkg = name.split(".")[0]
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                continue
            owners = defined.get(node.attr, set())
            if owners and pkg not in owners:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)} "
                           f"(private to {', '.join(sorted(owners))})")
    assert bad == []


def test_the_checks_see_a_violation():
    """The walker itself: an upward import and a private access are found."""
    tree = ast.parse("from provider import coordinator\nx = pool._volumes\n")
    MODULES["blockstore._probe"] = (ROOT / "blockstore" / "_probe.py", tree)
    try:
        mods = [m for m, _, _ in _imports("blockstore._probe", ROOT / "blockstore/_probe.py",
                                          tree)]
        assert "provider.coordinator" in mods
        assert "blockstore" in _private_definitions()["_volumes"]
    finally:
        del MODULES["blockstore._probe"]
