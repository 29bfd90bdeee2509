"""Dependencies inside the package point one way: no module of ``moe_ops`` imports (at module level
or inside a function) a module that imports it back, directly or through others. ``backend.py``
imports nothing of the package but the settings table. (Backends are loaded by name through
``importlib``; those dynamic loads are the one sanctioned way back and are not edges here.)"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "moe_ops")


def _modules():
    out = {}
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
    return out


def _imports(name, path, known):
    pkg = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    edges = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            cands = subs or [target]  # `from . import x` imports the submodule x, not (again) the package
        elif isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        else:
            continue
        for c in cands:
            if c in known and c != name:
                edges.add(c)
    return edges


def _graph():
    mods = _modules()
    # a package's __init__ re-exports its children; an edge to a package counts as to __init__ only
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def _cycle(graph):
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle_inside_the_package():
    graph = {m: {n for n in e if n != "moe_ops"} for m, e in _graph().items() if m != "moe_ops"}
    assert "moe_ops.backend" in graph and graph["moe_ops.ops"]  # the walk found the modules
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_backend_switch_imports_only_the_settings():
    assert _graph()["moe_ops.backend"] <= {"moe_ops.envs"}


def test_the_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
