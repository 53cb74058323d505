"""Which Triton kernels the ahead-of-time compile (``aot``) must cover, read from the
kernel modules' source: a jit function referred to outside a jit function's body (a
``kernel[grid](...)`` launch, an assignment, an argument) is launched and needs a spec, and so
does a jit function that no kernel calls (else nothing compiles it); helpers called from other
kernels are compiled as part of their callers."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parent
PACKAGE = "oreo_fast.kernels"
NOT_KERNEL_MODULES = {"__init__", "aot", "aot_coverage"}


def module_names() -> list[str]:
    """Every module in kernels/ that may hold kernels (new ones are picked up by their file)."""
    return sorted(f"{PACKAGE}.{path.stem}" for path in KERNELS_DIR.glob("*.py")
                  if path.stem not in NOT_KERNEL_MODULES)


def module_source(name: str) -> str:
    return (KERNELS_DIR / f"{name.rsplit('.', 1)[1]}.py").read_text()


def _is_jit_decorator(node: ast.expr) -> bool:
    if isinstance(node, ast.Call):
        node = node.func
    return (isinstance(node, ast.Name) and node.id == "jit") or \
        (isinstance(node, ast.Attribute) and node.attr == "jit")


def scan_source(source: str) -> dict:
    """What a kernel module's source says about its jit functions: ``jit`` (names defined with
    @triton.jit), ``called`` (names called inside some jit function's body) and ``referenced``
    (names used anywhere outside jit bodies: launches, aliases, arguments)."""
    tree = ast.parse(source)
    jit_defs = [node for node in ast.walk(tree)
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and any(_is_jit_decorator(d) for d in node.decorator_list)]
    inside = set()
    called = set()
    for fn in jit_defs:
        for node in ast.walk(fn):
            inside.add(id(node))
            if isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Name):
                    called.add(func.id)
                elif isinstance(func, ast.Attribute):
                    called.add(func.attr)
    referenced = set()
    for node in ast.walk(tree):
        if id(node) in inside:
            continue
        if isinstance(node, ast.Name):
            referenced.add(node.id)
        elif isinstance(node, ast.Attribute):
            referenced.add(node.attr)
    return {"jit": [fn.name for fn in jit_defs], "called": called, "referenced": referenced}


def kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)  # JITFunction and the interpreter's wrapper keep .fn
    return fn.__name__


def coverage_problems(names: list[str] | None = None, sources: dict | None = None,
                      specs: dict | None = None) -> list[str]:
    """Why the aot specs do not cover every launched kernel, as messages (empty: they do).

    ``sources`` / ``specs`` ({module: source text} / {module: aot_specs() or None}) stand in
    for the modules themselves; tests use them to check the rule on made-up modules."""
    names = module_names() if names is None else names
    scans, covered, problems = {}, {}, []
    for name in names:
        if sources is not None:
            scans[name] = scan_source(sources[name])
        else:
            scans[name] = scan_source(module_source(name))
        if not scans[name]["jit"]:
            continue
        if specs is not None:
            module_specs = specs.get(name)
        else:
            module = importlib.import_module(name)
            module_specs = module.aot_specs() if callable(getattr(module, "aot_specs", None)) \
                else None
        if module_specs is None:
            problems.append(f"{name} defines @triton.jit kernels {scans[name]['jit']} but no "
                            f"aot_specs()")
            continue
        covered[name] = {kernel_name(spec["kernel"]) for spec in module_specs}
        labels = [spec["label"] for spec in module_specs]
        if len(set(labels)) != len(labels):
            problems.append(f"{name}: aot_specs() labels are not unique")
    called_anywhere = set().union(*(scan["called"] for scan in scans.values())) if scans \
        else set()
    for name, scan in scans.items():
        if name not in covered:
            continue
        for fn in scan["jit"]:
            if fn in covered[name]:
                continue
            if fn in scan["referenced"]:
                problems.append(f"{name}.{fn} is launched (used outside a kernel) but no "
                                f"aot_specs() entry covers it")
            elif fn not in called_anywhere:
                problems.append(f"{name}.{fn} is a @triton.jit function that no kernel calls "
                                f"and no aot_specs() entry covers: nothing compiles it")
    return problems
