"""The module import graph of effitrans/, read from the source with `ast`: it has no cycle, nothing outside
effitrans/bench/ imports effitrans.bench, and no Python file of the repository edits sys.path."""

import ast
import os

from tests.helpers import ROOT

PACKAGE = os.path.join(ROOT, "effitrans")
TREES = ("effitrans", "configs", "experiments", "scripts", "tests")


def _python_files(top: str):
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        yield from (os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))


def _module_name(path: str) -> str:
    parts = os.path.splitext(os.path.relpath(path, ROOT))[0].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: str, module: str, modules: set) -> set:
    """The effitrans modules `path` imports anywhere in its body (function-level imports included);
    `from pkg import name` counts as importing pkg.name when that is a module, else pkg."""
    is_package = os.path.basename(path) == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package of `module`
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in modules else target)
    return {name for name in out if name in modules}


def import_graph() -> dict:
    """module -> set of effitrans modules it imports."""
    files = {_module_name(p): p for p in _python_files(PACKAGE)}
    return {module: _imports(path, module, set(files)) - {module} for module, path in files.items()}


def find_cycle(graph: dict) -> list | None:
    """One cycle [a, b, ..., a] of `graph`, or None."""
    state = {}  # module -> 1 while on the DFS stack, 2 when done

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, stack)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def test_cycle_finder_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_graph_resolves_submodules_and_relative_imports():
    graph = import_graph()
    assert "effitrans.schema" in graph and graph["effitrans.schema"] == set()  # the leaf
    assert "effitrans.attention.sparse_families" in graph["effitrans.attention"]  # `from pkg import mod`
    assert "effitrans.registry" in graph["effitrans.config_validation"]


def test_import_graph_is_acyclic():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_bench_imports_bench():
    bad = sorted(
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        if not (module == "effitrans.bench" or module.startswith("effitrans.bench."))
        for target in targets
        if target == "effitrans.bench" or target.startswith("effitrans.bench.")
    )
    assert not bad, "library modules import the benchmark harness: " + ", ".join(bad)


def _edits_sys_path(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "path":
            if isinstance(node.value, ast.Name) and node.value.id == "sys":
                return True  # sys.path.insert / append / assignment / any use
    return False


def test_no_file_edits_sys_path():
    bad = [
        os.path.relpath(path, ROOT)
        for tree in TREES
        for path in _python_files(os.path.join(ROOT, tree))
        if _edits_sys_path(ast.parse(open(path).read(), path))
    ]
    assert not bad, "files that edit sys.path: " + ", ".join(bad)
