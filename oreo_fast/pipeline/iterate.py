"""Iterative OREO: rounds of sample -> train, each round starting from the last policy.

Round r samples K responses per problem from the current policy, verifies them, and trains
OREO on them: the policy from the current one, the reference being the round's starting policy
unless ``reference="initial"``.

The value model starts fresh each round (from the round's starting policy, zero head) when the
reference moves, and carries over from the last round when it stays (``value_each_round``
"auto"). OREO's value is soft: it regresses R - beta * sum of log(pi / pi_ref), so it is
relative to its reference. Carried into a round whose reference is the last policy, it is off
by the old log-ratios, and the first updates push the policy by (V - R) / beta per token on
every sample; with the embedded task this drove V above 1 and the policy to 0 accuracy in one
round (README, "Iterated RFT and OREO").
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from oreo_fast.config import reject, require_at_least, require_choice
from oreo_fast.io import write_json
from oreo_fast.models import check_device_and_dtype, resolve_device
from oreo_fast.sampling import check_sampling


def launch_training(overrides: list[str], nproc: int, log_path: Path, threads: int = 0,
                    module: str = "oreo_fast.train") -> None:
    """Run ``python -m oreo_fast.train`` in a subprocess: through torchrun when nproc > 1. The
    log goes to ``log_path``; a failure raises with the end of the log. ``threads`` > 0 sets
    OMP_NUM_THREADS for the workers; 0 leaves the environment's (torchrun sets 1 per worker
    when nothing is set). ``module``: another entry that wraps the trainer (an experiment's)."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", module, *overrides]
    else:
        cmd = [sys.executable, "-m", module, *overrides]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        text = log_path.read_text(encoding="utf-8", errors="replace")
        raise RuntimeError(f"{describe_failure(proc.returncode, text, overrides)}; "
                           f"{log_path}:\n{text[-4000:]}")


# torchrun's failure report: "rank      : 1 (local_rank: 1)" then "exitcode  : -9 (pid: ...)"
_KILLED_RANK = re.compile(r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*-9\b")


def describe_failure(returncode: int, log_text: str, overrides: list[str]) -> str:
    """One line on a failed training run. A worker killed by SIGKILL (exit -9, from torchrun
    or the process itself) is named, with the knobs that lower its memory: the usual sender
    is the kernel's out-of-memory killer."""
    ranks = sorted({int(r) for r in _KILLED_RANK.findall(log_text)})
    if not ranks and returncode not in (-9, 137):
        return f"training failed (exit {returncode})"
    who = f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}" if ranks \
        else "the training process"
    settings = dict(o.split("=", 1) for o in overrides if "=" in o)
    micro = settings.get("micro_batch_size", "8 (the default)")
    checkpointing = settings.get("gradient_checkpointing", "false")
    return (f"training failed: {who} killed by SIGKILL (exit -9), most likely out of memory; "
            f"lower micro_batch_size (now {micro})"
            + ("" if checkpointing.lower() in ("true", "1", "yes") else
               " or set gradient_checkpointing=true")
            + ", or train on more processes (FSDP2 shards parameters, gradients and Adam)")


@dataclass
class IterateConfig:
    policy: str  # starting policy (the SFT model)
    problems: str  # training problems (GSM8K or MATH shape)
    out: str  # folder for the rounds
    value: str = ""  # the first round's value model (e.g. an earlier OREO run's); empty: policy
    # later rounds' value: "carry" (the last round's), "fresh" (from the round's starting
    # policy), "auto" (carry when the reference is "initial", else fresh: see the docstring)
    value_each_round: str = "auto"
    rounds: int = 3
    k: int = 8  # responses per problem per round
    temperature: float = 1.0
    max_new_tokens: int = 1024  # GSM8K/MATH solutions of 1.5B-7B models (the demo: 128)
    reference: str = "previous"  # "previous": the round's starting policy; "initial": policy
    eval_problems: str = ""  # evaluated (greedy) after every round when given
    nproc: int = 1  # training processes (torchrun when > 1)
    threads: int = 0  # CPU threads per training process (0: OMP_NUM_THREADS or torch's default)
    device: str = "auto"  # sampling, eval and training: "auto" (CUDA when present), cpu, cuda
    dtype: str = "auto"  # sampling and eval; "auto": bfloat16 on CUDA, float32 on CPU
    seed: int = 0
    prompt_format: str = "auto"  # plain | chat | auto, for sampling, training and evaluation
    split: str | None = None  # split of a datasets source for sampling (default: train)
    subset: str | None = None  # configuration of a hub dataset (GSM8K: main)
    columns: str | None = None  # role=column pairs, e.g. question=problem,solution=solution
    system_prompt: str | None = None  # system message of chat prompts
    train_overrides: list[str] = field(default_factory=list)  # key=value for the trainer (TrainConfig)

    def __post_init__(self):
        require_at_least(self, 1, "rounds", "k", "max_new_tokens", "nproc")
        require_at_least(self, 0, "threads")
        check_device_and_dtype(self)
        require_choice(self, "reference", ("previous", "initial"))
        require_choice(self, "value_each_round", ("auto", "carry", "fresh"))
        require_choice(self, "prompt_format", ("auto", "plain", "chat"))
        check_sampling(self)
        if any(o.replace(" ", "") == "lora_export=adapter" for o in self.train_overrides):
            # the next round samples from this round's policy/ folder: a whole model
            reject(self, "train_overrides", "lora_export=adapter cannot chain rounds "
                   "(each round starts from the last policy/ folder); leave it merged")


def run_iterate(config: IterateConfig) -> dict:
    from oreo_fast.pipeline.evaluate import EvalConfig, run_eval
    from oreo_fast.pipeline.sample import SampleConfig, run_sample

    out = Path(config.out)
    policy, value = Path(config.policy), Path(config.value) if config.value else None
    carry = config.value_each_round == "carry" or (config.value_each_round == "auto"
                                                   and config.reference == "initial")
    rounds = []
    for r in range(config.rounds):
        t0 = time.time()
        folder = out / f"round-{r}"
        trajectories = run_sample(SampleConfig(
            model=str(policy), problems=config.problems, out=str(folder / "trajectories.jsonl"),
            k=config.k, temperature=config.temperature, max_new_tokens=config.max_new_tokens,
            seed=config.seed + r, device=config.device, dtype=config.dtype,
            prompt_format=config.prompt_format, split=config.split, subset=config.subset,
            columns=config.columns, system_prompt=config.system_prompt))
        reference = policy if config.reference == "previous" else Path(config.policy)
        overrides = [f"policy={policy}", f"reference={reference}", f"train_file={trajectories}",
                     f"output_dir={folder}", f"seed={config.seed + r}", "progress=false",
                     f"device={resolve_device(config.device).type}",
                     f"prompt_format={config.prompt_format}",
                     *([f"value={value}"] if value else []), *config.train_overrides]
        launch_training(overrides, config.nproc, folder / "train.log", config.threads)
        policy = folder / "policy"
        # OREO's value (RFT trains none), or none: the next round builds a fresh one
        value = folder / "value" if carry and (folder / "value").exists() else None
        stats = json.loads(Path(str(trajectories) + ".stats.json").read_text())
        row = {"round": r, "policy": str(policy), "sample_reward_rate": stats.get("reward_rate"),
               "seconds": time.time() - t0}
        if config.eval_problems:
            report = run_eval(EvalConfig(model=str(policy), problems=config.eval_problems,
                                         out=str(folder / "eval.json"), n_samples=0,
                                         max_new_tokens=config.max_new_tokens,
                                         device=config.device, dtype=config.dtype,
                                         prompt_format=config.prompt_format,
                                         subset=config.subset, columns=config.columns,
                                         system_prompt=config.system_prompt))
            row["greedy_accuracy"] = report["greedy_accuracy"]
        rounds.append(row)
        write_json(out / "iterate.json", {"config": asdict(config), "rounds": rounds})
    return {"config": asdict(config), "rounds": rounds}
