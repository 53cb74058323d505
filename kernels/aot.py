"""Ahead-of-time compile of every launched Triton kernel for real GPU targets, on any machine.

The CPU tests run the kernels in Triton's interpreter, which accepts programs the GPU compiler
rejects (tl.dot shapes, dtype mismatches, shared memory and register limits). Triton ships
ptxas, so the whole pipeline down to a cubin runs without a GPU; this module drives it.

Protocol. A module in ``kernels/`` that defines ``@triton.jit`` kernels exposes
``aot_specs()``, a list of dicts, one per configuration its launchers can produce:

    kernel       the @triton.jit function as the launcher launches it
    signature    {parameter: type} for every runtime parameter: "*bf16", "*fp32", "*i64",
                 "*u1" (a bool tensor), "i32", "i64", "fp32", ... as the JIT would specialise
                 the launcher's arguments
    constexprs   {parameter: value} for every tl.constexpr parameter, and for any integer
                 argument the JIT specialises to a constant (it does so for the value 1: a
                 unit stride, a single token)
    num_warps    int
    label        str, unique within the module
    aligned      optional: integer parameters the launch passes as multiples of 16 (the JIT
                 specialises on that); pointers are taken as 16-byte aligned, as PyTorch
                 allocates them

Helpers (``@triton.jit`` functions only called from other kernels) need no spec: they are
compiled as part of their callers. ``aot_coverage.coverage_problems`` tells them apart from launched
kernels by reading the module's source: a jit function referred to anywhere outside a jit
function's body (a ``kernel[grid](...)`` launch, an assignment, an argument) is launched, and
every jit function that no kernel calls must be covered too (else nothing compiles it).

``python -m oreo_fast.kernels.aot --out FILE`` compiles every spec of every module for every
target this toolchain's ptxas supports (sm_80 and sm_90 always, sm_100 when it can) and
writes registers, spills and shared memory per (spec, target) as JSON. Importing this module
needs neither Triton nor a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from oreo_fast.kernels.aot_coverage import coverage_problems, kernel_name, module_names

REQUIRED_TARGETS = (80, 90)
OPTIONAL_TARGETS = (100,)
# Shared memory one block may use (opt-in maximum), bytes; a launch asking more fails.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}
REGISTERS_PER_BLOCK = 65536

# torch dtype -> the element type Triton's JIT gives a tensor of it
_ELEMENT = {
    "bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64",
    "bool": "u1", "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64",
}


def pointer(dtype) -> str:
    """Signature type of a tensor argument of torch dtype ``dtype``, e.g. '*bf16'."""
    return "*" + _ELEMENT[str(dtype).removeprefix("torch.")]


def int_type(value: int) -> str:
    """Signature type the JIT gives an integer argument (a value of 1 becomes a constexpr)."""
    return "i32" if -2**31 <= value < 2**31 else "i64"


def int_args(**values: int):
    """(signature, constexprs, aligned) of integer arguments with these values, specialised as
    Triton's JIT specialises them at a launch: 1 becomes a constant, a multiple of 16 is
    marked so, anything else is i32 or i64 by its range."""
    signature, constexprs, aligned = {}, {}, []
    for name, value in values.items():
        if value == 1:
            constexprs[name] = 1
            continue
        signature[name] = int_type(value)
        if value % 16 == 0:
            aligned.append(name)
    return signature, constexprs, aligned


def unique_specs(specs: list[dict]) -> list[dict]:
    """Merge specs that compile to the same program (same kernel, signature, constants, warps
    and alignment), joining their labels, so that each program is compiled once."""
    merged: dict = {}
    for spec in specs:
        key = (spec["kernel"], tuple(sorted(spec["signature"].items())),
               tuple(sorted((k, repr(v)) for k, v in spec["constexprs"].items())),
               spec["num_warps"], tuple(sorted(spec.get("aligned", ()))))
        if key in merged:
            if spec["label"] not in merged[key]["label"].split(" | "):
                merged[key]["label"] += " | " + spec["label"]
        else:
            merged[key] = dict(spec)
    return list(merged.values())


# ------------------------------------------------------------------ targets and compiling


def _ptxas_arches(capability: int) -> str:
    """The --gpu-name values the ptxas Triton uses for ``capability`` accepts (its help)."""
    import subprocess

    from triton.backends.nvidia.compiler import get_ptxas

    path = get_ptxas(capability).path
    return subprocess.run([path, "--help"], capture_output=True, text=True, check=True).stdout


def supported_targets() -> list[int]:
    """Compute capabilities to compile for: sm_80 and sm_90, and each optional one whose
    architecture name (as Triton spells it, e.g. sm_100a) the bundled ptxas lists."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    found = []
    for capability in REQUIRED_TARGETS + OPTIONAL_TARGETS:
        try:
            listed = f"'{sm_arch_from_capability(capability)}'" in _ptxas_arches(capability)
        except (OSError, RuntimeError, ValueError, ImportError):
            listed = False
        if listed or capability in REQUIRED_TARGETS:
            found.append(capability)
    return found


def _full_signature(spec: dict):
    """(signature over every parameter, constexprs, attrs) for ASTSource; raises ValueError
    for a spec that names parameters the kernel lacks or leaves one out."""
    params = list(spec["kernel"].arg_names)
    signature, constexprs = spec["signature"], spec["constexprs"]
    unknown = (set(signature) | set(constexprs) | set(spec.get("aligned", ()))) - set(params)
    if unknown:
        raise ValueError(f"spec names parameters the kernel lacks: {sorted(unknown)}")
    full, attrs = {}, {}
    for index, param in enumerate(params):
        if param in constexprs:
            full[param] = "constexpr"
            continue
        if param not in signature or signature[param] == "constexpr":
            raise ValueError(f"spec gives no type or constant for parameter {param!r}")
        full[param] = signature[param]
        if signature[param].startswith("*") or param in spec.get("aligned", ()):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return full, dict(constexprs), attrs


_PTXAS_PATTERNS = {
    "registers": r"Used (\d+) registers",
    "stack_frame": r"(\d+) bytes stack frame",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "ptxas_smem": r"(\d+) bytes smem",
}


def parse_ptxas_log(log: str) -> dict:
    values = {}
    for key, pattern in _PTXAS_PATTERNS.items():
        match = re.search(pattern, log)
        values[key] = int(match.group(1)) if match else (0 if key == "ptxas_smem" else None)
    return values


def results_cache_dir() -> Path | None:
    """Where compile reports are kept between runs (OREO_AOT_CACHE; "off" or "" for none)."""
    path = os.environ.get("OREO_AOT_CACHE", str(Path.home() / ".cache" / "oreo_fast" / "aot"))
    return Path(path) if path not in ("", "off") else None


def _cache_key(source, capability: int, num_warps: int) -> str:
    """Triton's own compile key for this program: its version, the kernel's and its callees'
    source, the signature, constants and attributes, the target and ptxas, the options and
    the environment variables that change code generation."""
    import hashlib

    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.cache import get_cache_key

    backend = make_backend(GPUTarget("cuda", capability, 32))
    options = backend.parse_options({"num_warps": num_warps})
    key = get_cache_key(source, backend, options, get_cache_invalidating_env_vars())
    return hashlib.sha256(key.encode()).hexdigest()


def compile_spec(spec: dict, capability: int, use_cache: bool = True) -> dict:
    """Compile one spec for one target; the result row (``error`` is None on success). A
    report kept under ``results_cache_dir()`` for the same compile key is reused."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    result = {
        "kernel": kernel_name(spec["kernel"]), "label": spec["label"],
        "target": sm_arch_from_capability(capability), "capability": capability,
        "num_warps": spec["num_warps"],
        "spills_allowed": any(t == "*fp64" for t in spec["signature"].values()),
        "error": None,
    }
    log = io.StringIO()
    start = time.perf_counter()
    cache_file = None
    try:
        signature, constexprs, attrs = _full_signature(spec)
        source = triton.compiler.ASTSource(fn=spec["kernel"], signature=signature,
                                           constexprs=constexprs, attrs=attrs)
        cache_dir = results_cache_dir() if use_cache else None
        if cache_dir is not None:
            cache_file = cache_dir / f"{_cache_key(source, capability, spec['num_warps'])}.json"
            if cache_file.exists():
                cached = json.loads(cache_file.read_text())
                return {**result, **cached, "cached": True}
        # ptxas -v's report, which Triton prints; only a real compile (not Triton's cache) has it
        knobs.nvidia.dump_ptxas_log = True
        always_compile, knobs.compilation.always_compile = \
            knobs.compilation.always_compile, True
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                          options={"num_warps": spec["num_warps"]})
        finally:
            knobs.compilation.always_compile = always_compile
    except Exception as error:  # noqa: BLE001 - every failure is a result to report
        # failures are not cached: a run after the fix must compile again
        result["error"] = f"{type(error).__name__}: {error}"[:4000]
        result["compile_s"] = round(time.perf_counter() - start, 3)
        return result
    measured = parse_ptxas_log(log.getvalue())
    measured["shared"] = compiled.metadata.shared
    measured["compile_s"] = round(time.perf_counter() - start, 3)
    if measured["registers"] is None:
        result["error"] = "no ptxas report in Triton's output"
    elif cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(measured))
        partial.replace(cache_file)
    return {**result, **measured, "cached": False}


def resource_problems(result: dict) -> list[str]:
    """What would stop this compiled kernel from launching, or a spill where none is allowed."""
    if result["error"]:
        return [f"compile error: {result['error']}"]
    problems = []
    threads = result["num_warps"] * 32
    limit = SHARED_LIMIT.get(result["capability"])
    shared = result["shared"] + result["ptxas_smem"]
    if limit is not None and shared > limit:
        problems.append(f"needs {shared} bytes of shared memory, the target allows {limit}")
    if result["registers"] * threads > REGISTERS_PER_BLOCK:
        problems.append(f"{result['registers']} registers x {threads} threads exceed "
                        f"{REGISTERS_PER_BLOCK}")
    if not result["spills_allowed"] and (result["spill_stores"] or result["spill_loads"]):
        problems.append(f"spills {result['spill_stores']} bytes (stores) / "
                        f"{result['spill_loads']} bytes (loads) of registers")
    return problems


# ------------------------------------------------------------------ parallel driver


_SPECS_CACHE: dict = {}


def _module_specs(name: str) -> list[dict]:
    if name not in _SPECS_CACHE:
        module = importlib.import_module(name)
        _SPECS_CACHE[name] = module.aot_specs() if hasattr(module, "aot_specs") else []
    return _SPECS_CACHE[name]


def _compile_item(item) -> dict:
    name, index, capability, use_cache = item
    result = compile_spec(_module_specs(name)[index], capability, use_cache)
    result["module"] = name
    return result


def _worker_init(cache_dir: str):
    # a private, empty cache: every compile runs ptxas, whose report gives the registers
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launches' default today


def compile_all(targets: list[int] | None = None, jobs: int | None = None,
                use_cache: bool = True) -> dict:
    """Check coverage and compile every spec of every kernel module for every target."""
    os.environ["TRITON_INTERPRET"] = "0"  # before any kernel module is imported
    import triton  # noqa: F401  (fails loudly here if Triton is missing)

    targets = supported_targets() if targets is None else targets
    names = module_names()
    problems = coverage_problems(names)
    items = [(name, index, capability, use_cache) for name in names
             for index in range(len(_module_specs(name))) for capability in targets]
    for name in names:
        for spec in _module_specs(name):
            if type(spec["kernel"]).__name__ != "JITFunction":
                raise RuntimeError("kernels were decorated for the interpreter: run this "
                                   "in a process without TRITON_INTERPRET=1")
    jobs = jobs or min(8, len(os.sched_getaffinity(0)))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="oreo_aot_cache_") as cache_dir:
        if jobs <= 1:
            _worker_init(cache_dir)
            results = [_compile_item(item) for item in items]
        else:
            import multiprocessing

            with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_worker_init, initargs=(cache_dir,)) as pool:
                results = list(pool.map(_compile_item, items, chunksize=4))
    for result in results:
        result["problems"] = resource_problems(result)
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    return {
        "targets": [sm_arch_from_capability(c) for c in targets],
        "cached": sum(bool(r.get("cached")) for r in results),
        "specs_per_target": {name: len(_module_specs(name)) for name in names},
        "compiles": len(results),
        "jobs": jobs,
        "wall_s": round(time.perf_counter() - start, 1),
        "coverage_problems": problems,
        "results": results,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the report as JSON here")
    parser.add_argument("--targets", help="compute capabilities, e.g. 80,90 (default: all "
                        "this ptxas supports)")
    parser.add_argument("--jobs", type=int, help="parallel compiles (default: usable cores)")
    parser.add_argument("--no-cache", action="store_true", help="compile everything afresh "
                        "rather than reuse reports kept from earlier runs")
    args = parser.parse_args(argv)
    targets = [int(t) for t in args.targets.split(",")] if args.targets else None
    report = compile_all(targets, args.jobs, use_cache=not args.no_cache)
    failing = [r for r in report["results"] if r["problems"]]
    for r in failing:
        print(f"FAIL {r['module']}.{r['kernel']} [{r['label']}] {r['target']}: "
              f"{'; '.join(r['problems'])}", file=sys.stderr)
    for problem in report["coverage_problems"]:
        print(f"FAIL coverage: {problem}", file=sys.stderr)
    print(f"{report['compiles']} compiles for {', '.join(report['targets'])} in "
          f"{report['wall_s']} s with {report['jobs']} jobs; {len(failing)} failing")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 1 if failing or report["coverage_problems"] else 0


if __name__ == "__main__":
    # run the importable module's main, so that spawned workers find its functions by name
    from oreo_fast.kernels import aot as _aot

    sys.exit(_aot.main())
