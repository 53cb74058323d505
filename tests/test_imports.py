"""The layering of oreo_fast, read from the source: imports flow one way,

    kernels <- ops <- shared leaves <- train / search <- pipeline <- cli

with no cycles between modules and no module reaching into another's ``_private`` names.
Function-local (lazy) imports count like top-level ones."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = {"errors", "io", "config", "preflight", "models", "tokenizer", "sampling", "tasks"}
# what each layer may import (besides itself)
ALLOWED = {
    "kernels": {"kernels"},
    "ops": {"kernels", "ops"},
    "shared": {"kernels", "ops", "shared"},
    "train": {"kernels", "ops", "shared", "train"},
    "search": {"kernels", "ops", "shared", "search"},
    "pipeline": {"kernels", "ops", "shared", "train", "search", "pipeline"},
    "cli": {"kernels", "ops", "shared", "train", "search", "pipeline", "cli"},
    "package": {"ops"},  # oreo_fast/__init__.py: the public losses
}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, ``kernels/`` installed as ``oreo_fast.kernels``."""
    out = {}
    for base, prefix in ((ROOT / "oreo_fast", "oreo_fast"), (ROOT / "kernels", "oreo_fast.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


MODULES = module_files()


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    top = parts[1]
    if top in ("kernels", "ops", "train", "search", "pipeline", "cli"):
        return top
    if top in SHARED:
        return "shared"
    raise AssertionError(f"{module}: a module outside the known layers; add it to one")


def resolve(name: str) -> str | None:
    """The oreo_fast module an imported dotted name refers to (its longest known prefix)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def imports_of(module: str) -> list[tuple[str, int, list[str]]]:
    """(imported module, line, names taken from it) for every oreo_fast import in a module."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = resolve(alias.name)
                if target:
                    found.append((target, node.lineno, []))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("oreo_fast"):
                continue
            for alias in node.names:
                sub = resolve(f"{base}.{alias.name}")
                if sub == f"{base}.{alias.name}":  # a submodule
                    found.append((sub, node.lineno, []))
                elif resolve(base):
                    found.append((resolve(base), node.lineno, [alias.name]))
    return found


def graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in imports_of(m) if t != m} for m in MODULES}


def test_every_module_is_in_a_layer():
    for module in MODULES:
        layer(module)


def test_imports_flow_one_way():
    bad = []
    for module in MODULES:
        mine = layer(module)
        for target, line, _ in imports_of(module):
            theirs = layer(target)
            if theirs not in ALLOWED[mine]:
                bad.append(f"{MODULES[module].relative_to(ROOT)}:{line}: {mine} module "
                           f"{module} imports {theirs} module {target}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            # a package's __init__ re-exporting its own submodules is not a cycle
            if node == nxt.rsplit(".", 1)[0] or nxt == node.rsplit(".", 1)[0]:
                continue
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_names_across_modules():
    bad = []
    for module in MODULES:
        path = MODULES[module]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {}  # local name -> imported oreo_fast module
        for target, line, names in imports_of(module):
            bad += [f"{path.relative_to(ROOT)}:{line}: imports {target}.{n}"
                    for n in names if n.startswith("_") and target != module]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("oreo_fast"):
                for alias in node.names:
                    sub = resolve(f"{node.module}.{alias.name}")
                    if sub == f"{node.module}.{alias.name}":
                        aliases[alias.asname or alias.name] = sub
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname and resolve(alias.name):
                        aliases[alias.asname] = resolve(alias.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in aliases and node.attr.startswith("_") \
                    and not node.attr.startswith("__"):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: "
                           f"{aliases[node.value.id]}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_modules_stay_short():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 420}
    assert not long, f"modules over 420 lines (split them): {long}"


@pytest.mark.parametrize("edges, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
])
def test_the_cycle_finder_finds_cycles(edges, expected):
    assert find_cycle(edges) == expected


def test_the_checks_catch_an_upward_and_a_private_import(tmp_path, monkeypatch):
    """The checks read real files: a planted upward import and a private name fail them."""
    planted = ROOT / "oreo_fast" / "ops" / "_planted_for_test.py"
    planted.write_text("from oreo_fast.train.trainer import Trainer\n"
                       "from oreo_fast.ops.logits import _log_ratio_\n", encoding="utf-8")
    try:
        monkeypatch.setitem(MODULES, "oreo_fast.ops._planted_for_test", planted)
        with pytest.raises(AssertionError, match="ops module .* imports train module"):
            test_imports_flow_one_way()
        with pytest.raises(AssertionError, match="_log_ratio_"):
            test_no_private_names_across_modules()
    finally:
        planted.unlink()
