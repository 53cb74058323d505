"""Record registers, spills and shared memory of every kernel spec for every GPU target.

    python -m benchmarks.aot_compile            # -> benchmarks/results/aot_compile_<targets>_<date>.json

Runs ``oreo_fast.kernels.aot`` in a process without TRITON_INTERPRET and adds the
environment: Triton and torch versions, CPU model, date and commit. Reports of programs
compiled before (same Triton compile key) are reused from its cache, with the compile time
measured then, unless ``--fresh``; ``cached`` counts them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.report import REPO_ROOT, environment


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="output JSON (default: benchmarks/results/...)")
    parser.add_argument("--jobs", type=int, help="parallel compiles (default: usable cores)")
    parser.add_argument("--fresh", action="store_true", help="compile every spec again")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "aot.json"
        command = [sys.executable, "-m", "oreo_fast.kernels.aot", "--out", str(raw)]
        if args.fresh:
            command.append("--no-cache")
        if args.jobs:
            command += ["--jobs", str(args.jobs)]
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        run = subprocess.run(command, env=env, cwd=REPO_ROOT)
        report = json.loads(raw.read_text())
    today = datetime.date.today().isoformat()
    targets = "-".join(t.removeprefix("sm_").rstrip("a") for t in report["targets"])
    out = Path(args.out) if args.out else \
        REPO_ROOT / "benchmarks" / "results" / f"aot_compile_sm{targets.replace('-', '-sm')}_{today}.json"
    record = {
        "what": "oreo_fast.kernels.aot: every aot_specs() entry of every kernels/ module "
                "compiled by Triton and its bundled ptxas for each target, on a CPU machine "
                "(no GPU). registers / spill_stores / spill_loads / stack_frame: ptxas -v; "
                "shared: the dynamic shared memory Triton asks at launch (bytes); "
                "ptxas_smem: static shared memory; compile_s: wall time of the compile "
                "with `jobs` compiles in parallel.",
        "date": today,
        "environment": environment(torch.device("cpu")),
        "driver_exit_code": run.returncode,
        **report,
    }
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
