"""Every launched Triton kernel compiles for real GPUs, without spilling registers.

The other kernel tests run in Triton's interpreter, which accepts what the GPU compiler
rejects (tl.dot shapes, dtype mismatches, shared memory and register limits). Here each
``aot_specs()`` entry of every module in kernels/ (see ``oreo_fast.kernels.aot``) goes through
Triton's whole pipeline and the bundled ptxas for sm_80 and sm_90 (and sm_100 when that ptxas
knows it), in a separate process without TRITON_INTERPRET. Reports of unchanged programs are
reused from OREO_AOT_CACHE (default ~/.cache/oreo_fast/aot): the first run takes minutes on
two cores, later ones seconds.
"""
import json
import os
import subprocess
import sys
import textwrap
import types

import pytest

pytest.importorskip("triton")

from oreo_fast.kernels import aot, aot_coverage  # noqa: E402

TIMEOUT_S = 1800


def _run_without_interpreter(args, **kwargs):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S, **kwargs)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "report.json"
    run = _run_without_interpreter(["-m", "oreo_fast.kernels.aot", "--out", str(out)])
    if not out.exists():
        pytest.fail(f"the AOT driver wrote no report:\n{run.stdout}\n{run.stderr[-6000:]}")
    return json.loads(out.read_text())


def _describe(rows):
    return "\n".join(f"{r['module']}.{r['kernel']} [{r['label']}] {r['target']}: "
                     f"{'; '.join(r['problems'])}" for r in rows)


def test_every_launched_kernel_is_covered_by_aot_specs(report):
    assert report["coverage_problems"] == []
    with_kernels = [name for name in aot.module_names()
                    if aot_coverage.scan_source(aot_coverage.module_source(name))["jit"]]
    assert with_kernels, "no kernel module found"
    for name in with_kernels:
        assert report["specs_per_target"][name] > 0, name


def test_targets_include_sm80_and_sm90(report):
    assert {"sm_80", "sm_90a"} <= set(report["targets"])
    assert report["compiles"] == len(report["targets"]) * sum(report["specs_per_target"].values())


def test_every_spec_compiles_for_every_target(report):
    failed = [r for r in report["results"] if r["error"]]
    assert not failed, _describe(failed)


def test_no_register_spills_or_resource_overflows(report):
    """No spill for half-precision and float32 configs (float64 ones may spill: they are for
    tests), and registers and shared memory within what a launch may ask."""
    bad = [r for r in report["results"] if r["problems"]]
    assert not bad, _describe(bad)


# ------------------------------------------------------------ the checks themselves can fail


MADE_UP = textwrap.dedent('''
    import triton
    import triton.language as tl

    @triton.jit
    def _helper(x):
        return x * 2

    @triton.jit
    def _covered_kernel(x_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, _helper(tl.load(x_ptr + offs)))

    @triton.jit
    def _new_kernel(x_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1)

    @triton.jit
    def _unused_kernel(x_ptr):
        pass

    def launch(x):
        _covered_kernel[(1,)](x, BLOCK=16)
        _new_kernel[(1,)](x, BLOCK=16)
''')


def _Kernel(name):  # stands in for a JITFunction: the rule reads only the name
    return types.SimpleNamespace(fn=types.SimpleNamespace(__name__=name))


def test_coverage_rule_flags_an_uncovered_launched_kernel_and_a_module_without_specs():
    specs = {"pkg.made_up": [{"kernel": _Kernel("_covered_kernel"), "label": "a"}],
             "pkg.no_specs": None}
    problems = aot_coverage.coverage_problems(["pkg.made_up", "pkg.no_specs"],
                                     sources={"pkg.made_up": MADE_UP, "pkg.no_specs": MADE_UP},
                                     specs=specs)
    made_up = "\n".join(p for p in problems if p.startswith("pkg.made_up"))
    assert "pkg.made_up._new_kernel is launched" in made_up
    assert "pkg.made_up._unused_kernel" in made_up  # neither launched nor called: not compiled
    assert "_helper" not in made_up and "_covered_kernel" not in made_up
    assert any(p.startswith("pkg.no_specs defines @triton.jit kernels") for p in problems)
    all_covered = {"pkg.made_up": [{"kernel": _Kernel(n), "label": n}
                                   for n in ("_covered_kernel", "_new_kernel", "_unused_kernel")]}
    assert aot_coverage.coverage_problems(["pkg.made_up"], sources={"pkg.made_up": MADE_UP},
                                 specs=all_covered) == []


PROBE = textwrap.dedent('''
    import json, sys
    import triton
    import triton.language as tl
    from oreo_fast.kernels import aot

    @triton.jit
    def _good(a_ptr, b_ptr, out_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        a = tl.load(a_ptr + offs[:, None] * N + offs[None, :])
        b = tl.load(b_ptr + offs[:, None] * N + offs[None, :])
        tl.store(out_ptr + offs[:, None] * N + offs[None, :], tl.dot(a, b))

    def spec(kernel, a, b, n, warps=4):
        return {"kernel": kernel, "signature": {"a_ptr": a, "b_ptr": b, "out_ptr": "*fp32"},
                "constexprs": {"N": n}, "num_warps": warps, "label": f"{a} {b} N={n}"}

    cases = {"good": spec(_good, "*bf16", "*bf16", 32),
             "dot_too_small": spec(_good, "*bf16", "*bf16", 8),
             "fp32_dot_too_large": spec(_good, "*fp32", "*fp32", 256, warps=8)}
    out = {}
    for name, s in cases.items():
        r = aot.compile_spec(s, int(sys.argv[1]), use_cache=False)
        out[name] = {"error": r["error"], "problems": aot.resource_problems(r)}
    print(json.dumps(out))
''')


def test_compile_check_catches_what_the_interpreter_accepts(tmp_path):
    """Kernels the interpreter runs: a tl.dot with K = 8 (the compiler wants K >= 16) fails;
    a 256 x 256 x 256 float32 dot compiles but spills registers and needs more shared memory
    than an H100 has, both reported; a correct kernel passes."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    run = _run_without_interpreter([str(probe), "90"])
    assert run.returncode == 0, run.stderr[-4000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["good"] == {"error": None, "problems": []}
    assert out["dot_too_small"]["error"], out
    too_large = out["fp32_dot_too_large"]
    assert too_large["error"] is None
    assert any("shared memory" in p for p in too_large["problems"]), out
    assert any("spills" in p for p in too_large["problems"]), out
