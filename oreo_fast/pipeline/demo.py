"""``make demo``: the paper's comparison on the embedded default, from nothing, on a CPU.

Stages (each writes under ``out``): the embedded task, tokenizer and tiny model; a test set
of ``n_test`` held-out problems (the task's test split, then fresh ones); a validation split
of fresh problems (in neither train nor test, used to choose the demo's knobs); SFT on the
task's demonstrations (``sft.jsonl``); K sampled, verified responses per training problem;
the rejection-sampling baseline (RFT: SFT on the reward-1 samples) and OREO trained on those
same trajectories (OREO launched through torchrun); greedy accuracy of SFT, RFT and OREO, and
OREO's value-guided beam search, on the held-out test problems, printed as a table and
written to ``results.json`` with a bar chart.

With ``seeds`` > 1 the stages after SFT run once per seed: the sampling seed and the trainers'
data-order seed are both the seed number, so each seed has its own trajectories, RFT and OREO
from the one SFT checkpoint. Seed 0 keeps the single-seed layout (``out/trajectories.jsonl``,
``out/rft``, ``out/oreo``); seed s writes under ``out/seed-s``. Accuracies are means over seeds,
and the paired differences' intervals resample problems and seeds (``pipeline.stats``).
``first_seed`` and ``sft_seed`` move the seeds (a perturbation of the whole run); ``iterate``
adds rounds of iterated RFT and OREO after the first seed (``demo_iterate``).
"""
from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from oreo_fast.config import require_at_least
from oreo_fast.io import read_jsonl, write_json, write_jsonl
from oreo_fast.models import check_device_and_dtype, load_model, resolve_device
from oreo_fast.pipeline.demo_report import bar_chart, format_table
from oreo_fast.pipeline.iterate import launch_training
from oreo_fast.pipeline.sample import encode_problems
from oreo_fast.pipeline.stats import paired_difference, summarize
from oreo_fast.search.beam import SearchConfig
from oreo_fast.search.evaluate import load_value, search_accuracy
from oreo_fast.tasks.problems import load_problems
from oreo_fast.tokenizer import load_tokenizer

# Knobs for the 0.8M-parameter embedded model, the best of 4 configurations each for OREO and
# RFT on the validation split, 2 seeds each (experiments/tune.py; figures in
# benchmarks/results/tune_*_cpu_2026-11-30_cited-lines.json and the README, "The demo"). The
# paper's lr 5e-6 suits 1.5B-7B models; Adam's step is about the lr, so this model, whose SFT
# used 2e-3, needs far larger ones.
OREO_OVERRIDES = ["global_batch_size=128", "micro_batch_size=32", "policy_lr=1e-3",
                  "value_lr=1e-3", "beta=0.03", "kl_coef=0.01", "level=token", "epochs=1",
                  "max_length=256", "warmup_ratio=0.03"]
# The embedded default's SFT and sampling settings, explicit: the job defaults are for real
# models (oreo_fast.pipeline.sft.SFTConfig, max_new_tokens 1024)
EMBEDDED_SFT = dict(epochs=24.0, batch_size=32, lr=2e-3, min_lr_ratio=0.1, warmup_steps=20,
                    max_length=256)
EMBEDDED_MAX_NEW_TOKENS = 128
RFT_OVERRIDES = ["global_batch_size=128", "micro_batch_size=32", "policy_lr=3e-3", "epochs=1",
                 "max_length=256", "warmup_ratio=0.03"]


@dataclass
class DemoConfig:
    out: str = "runs/demo"  # output folder
    samples_per_problem: int = 8  # sampled responses per training problem
    n_test: int = 1000  # held-out test problems: the task's test split, then fresh ones
    n_val: int = 500  # fresh problems to choose knobs on (never the test split)
    nproc: int = 2  # OREO training processes (torchrun)
    threads: int = 1  # torch threads per OREO training process (1: the tiny model's fastest)
    # torch threads of the stages run in this process (SFT, sampling, evaluation, search):
    # fixed rather than torch's default (the core count), so that the numerics do not change
    # with the machine's core count
    stage_threads: int = 2
    device: str = "auto"  # every stage: "auto" (CUDA when present), cpu, cuda
    dtype: str = "auto"  # sampling, eval and search ("auto": bf16 on CUDA, fp32 on CPU)
    reuse: bool = False  # keep finished stages of an earlier run in out
    seeds: int = 3  # sampling + RFT/OREO data-order seeds, each from the same SFT model
    first_seed: int = 0  # the seeds are first_seed, first_seed + 1, ... (a perturbation)
    sft_seed: int = 0  # SFT's data-order seed
    quick: bool = False  # one seed only (a smoke run of every stage); overrides seeds
    iterate: int = 0  # rounds of iterated RFT and OREO (paper Fig. 2), the first seed's
    # runs being round 1 (0 or 1: none)
    sweep_problems: int = 100  # beam-width sweep (first seed only) on this many test problems
    oreo_overrides: list[str] = field(default_factory=lambda: list(OREO_OVERRIDES))
    rft_overrides: list[str] = field(default_factory=lambda: list(RFT_OVERRIDES))

    @property
    def rft_threads(self) -> int:
        """RFT trains in one process: it gets the threads of all of OREO's (measured on 2
        cores: 43 s against 72 s with one thread)."""
        return self.threads * self.nproc

    def __post_init__(self):
        require_at_least(self, 1, "samples_per_problem", "n_test", "n_val", "nproc", "threads",
                         "stage_threads", "seeds", "sweep_problems")
        require_at_least(self, 0, "first_seed", "sft_seed", "iterate")
        if self.quick:
            self.seeds = 1
        check_device_and_dtype(self)


# The demo's search knobs: B = 7 as in the paper's main results, K = 4 candidates per beam,
# steps of one line of the embedded task; the temperature was chosen on the validation split
# (README, "Value-guided beam search").
DEMO_SEARCH = dict(beams=7, candidates=4, max_steps=10, max_step_tokens=24, temperature=0.3)
DEMO_SWEEP_BEAMS = (1, 3, 5, 7)  # the paper's Figure 3
TEST_FILE = "test_held_out.jsonl"  # the demo's test set, under out/default


def demo_beam_search(run_dir, test_file, val_file=None, sweep_limit: int | None = None,
                     device: str = "auto", dtype: str = "auto", sweep: bool = True) -> dict:
    """The demo's "oreo_beam" stage: value-guided beam search with the OREO policy and value
    model in ``run_dir`` on the test problems and, unless ``val_file`` is None, the validation
    ones, and (``sweep``) a sweep over B (K fixed) on the first ``sweep_limit`` test problems
    (all when None)."""
    run_dir = Path(run_dir)
    tokenizer = load_tokenizer(run_dir / "policy")
    policy = load_model(run_dir / "policy", device=device, dtype=dtype)
    value = load_value(str(run_dir / "value"), policy, tokenizer, device, dtype)
    split = {}
    for name, path in (("test", test_file), ("val", val_file)):
        if path is None:
            continue
        split[name] = encode_problems(tokenizer, load_problems(path), 512, False, str(path))[0]
    cfg = SearchConfig(**DEMO_SEARCH)
    out = {"config": dict(DEMO_SEARCH)}
    for name, encoded in split.items():
        res = search_accuracy(policy, value, tokenizer, encoded, cfg, batch_size=50)
        out[name] = res["accuracy"]
        out[f"{name}_correct"] = [int(p["correct"]) for p in res["predictions"]]
        out[f"{name}_pool_accuracy"] = res["pool_accuracy"]
        out[f"{name}_value_diagnostics"] = res["value_diagnostics"]
        out[f"{name}_tokens"] = {k: res[k] for k in ("policy_tokens", "value_tokens",
                                                     "seconds")}
    if not sweep:
        return out
    sweep_problems = split["test"][:sweep_limit] if sweep_limit else split["test"]
    sweep = {}
    for beams in DEMO_SWEEP_BEAMS:
        if beams == cfg.beams and len(sweep_problems) == len(split["test"]):
            sweep[beams] = out["test"]
            continue
        res = search_accuracy(policy, value, tokenizer, sweep_problems,
                              SearchConfig(**{**DEMO_SEARCH, "beams": beams}), batch_size=50)
        sweep[beams] = res["accuracy"]
    out["sweep"] = {"candidates": cfg.candidates, "n_problems": len(sweep_problems),
                    "accuracy_by_beams": sweep}
    return out


def fresh_problems(default: Path, n: int, seed: int, exclude: tuple[str, ...],
                   name: str) -> list[dict]:
    """``n`` problems of the task drawn with another ``seed``, none of them in the
    ``exclude`` files of ``default`` (ids ``<name>-i``)."""
    from oreo_fast.tasks.arithmetic import ArithmeticConfig, generate_splits

    seen = {r["question"] for split in exclude for _, r in read_jsonl(default / split)}
    _, pool = generate_splits(ArithmeticConfig(seed=seed, n_train=0, n_test=n + n // 2 + 100))
    fresh = [r for r in pool if r["question"] not in seen][:n]
    if len(fresh) < n:
        raise ValueError(f"only {len(fresh)} {name} problems outside {', '.join(exclude)}")
    return [dict(r, id=f"{name}-{i}") for i, r in enumerate(fresh)]


def write_demo_splits(default: Path, n_val: int, n_test: int) -> None:
    """The validation split (``val.jsonl``: fresh problems, in neither train nor test) and
    the demo's test set (``TEST_FILE``: the task's own test split, then fresh problems up to
    ``n_test``, in none of train, test and validation). The training split, and so the
    tokenizer and SFT, stay those of the embedded default."""
    write_jsonl(default / "val.jsonl", fresh_problems(
        default, n_val, 104729, ("train.jsonl", "test.jsonl"), "val"))
    test = [r for _, r in read_jsonl(default / "test.jsonl")][:n_test]
    test += fresh_problems(default, n_test - len(test), 7919,
                           ("train.jsonl", "test.jsonl", "val.jsonl"), "test-extra")
    write_jsonl(default / TEST_FILE, test)


def _stage(name: str, done: Path, reuse: bool, times: dict, fn):
    if reuse and done.exists():
        print(f"[demo] {name}: reusing {done}", flush=True)
        return
    print(f"[demo] {name} ...", flush=True)
    t0 = time.time()
    fn()
    times[name] = round(time.time() - t0, 1)
    print(f"[demo] {name} done in {times[name]:.0f}s", flush=True)


def seed_dir(out: Path, seed: int) -> Path:
    """Where seed ``seed`` of a demo in ``out`` writes: ``out`` itself for seed 0 (the
    single-seed layout), ``out/seed-s`` otherwise."""
    return out if seed == 0 else out / f"seed-{seed}"


@dataclass
class SeedResult:
    """One seed's figures: accuracy and validation accuracy per method, the test outcomes
    per problem (``correct[method][problem]``) and OREO's beam-search report."""
    accuracy: dict
    val_accuracy: dict
    correct: dict
    beam: dict


def run_seed(config: DemoConfig, out: Path, seed: int, times: dict) -> SeedResult:
    """Sampling, RFT, OREO, their greedy evaluation and OREO's beam search for one seed (the
    sampling seed and the trainers' data-order seed), all from ``out/sft``; the first seed
    also evaluates SFT, which does not depend on it, and sweeps the beam width. Seed 0 writes
    in ``out`` itself (the single-seed layout), seed s in ``out/seed-s``."""
    from oreo_fast.pipeline.evaluate import EvalConfig, run_eval
    from oreo_fast.pipeline.sample import SampleConfig, run_sample

    first = seed == config.first_seed
    default, on = out / "default", dict(device=config.device, dtype=config.dtype)
    train, val, test = default / "train.jsonl", default / "val.jsonl", default / TEST_FILE
    run = seed_dir(out, seed)
    tag = "" if seed == 0 else f" (seed {seed})"
    trajectories = run / "trajectories.jsonl"
    _stage("sample" + tag, trajectories, config.reuse, times, lambda: run_sample(SampleConfig(
        model=str(out / "sft"), problems=str(train), out=str(trajectories),
        k=config.samples_per_problem, max_new_tokens=EMBEDDED_MAX_NEW_TOKENS, seed=seed,
        **on)))
    common = [f"policy={out / 'sft'}", f"train_file={trajectories}", f"seed={seed}",
              f"device={resolve_device(config.device).type}"]
    _stage("rft" + tag, run / "rft" / "policy" / "config.json", config.reuse, times,
           lambda: launch_training(common + ["algorithm=rft", f"output_dir={run / 'rft'}",
                                             *config.rft_overrides],
                                   1, run / "rft.log", config.rft_threads))
    _stage("oreo" + tag, run / "oreo" / "policy" / "config.json", config.reuse, times,
           lambda: launch_training(common + [f"output_dir={run / 'oreo'}", *config.oreo_overrides],
                                   config.nproc, run / "oreo.log", config.threads))

    models = {"rft": run / "rft" / "policy", "oreo": run / "oreo" / "policy"}
    if first:
        models = {"sft": out / "sft", **models}
    result = SeedResult({}, {}, {}, {})
    t0 = time.time()
    for name, path in models.items():
        for split, target, store in (("test", test, result.accuracy),
                                     ("val", val, result.val_accuracy)):
            report = run_eval(EvalConfig(model=str(path), problems=str(target), n_samples=0,
                                         max_new_tokens=EMBEDDED_MAX_NEW_TOKENS,
                                         out=str(run / f"eval_{name}_{split}.json"), **on))
            store[name] = report["greedy_accuracy"]
            if split == "test":
                result.correct[name] = report["greedy_correct"]
    times["eval" + tag] = round(time.time() - t0, 1)
    t0 = time.time()  # oreo_beam: value-guided beam search with OREO's policy and value
    # validation and the B sweep on the first seed only (search is the demo's dearest stage)
    beam = demo_beam_search(run / "oreo", test, val if first else None,
                            sweep_limit=config.sweep_problems, sweep=first, **on)
    result.accuracy["oreo_beam"] = beam["test"]
    if first:
        result.val_accuracy["oreo_beam"] = beam["val"]
        beam.pop("val_correct")
    result.correct["oreo_beam"] = beam.pop("test_correct")
    result.beam = beam
    times["oreo_beam" + tag] = round(time.time() - t0, 1)
    print(f"[demo] oreo_beam{tag} (B={beam['config']['beams']}, K={beam['config']['candidates']})"
          f" test {beam['test']:.3f}"
          + (f", by B: {beam['sweep']['accuracy_by_beams']}" if "sweep" in beam else ""),
          flush=True)
    return result


METHODS = ("sft", "rft", "oreo", "oreo_beam")


def run_demo(config: DemoConfig) -> dict:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(config.stage_threads)
    try:
        return _run_stages(config)
    finally:
        torch.set_num_threads(previous)


def _run_stages(config: DemoConfig) -> dict:
    from oreo_fast.pipeline.embedded import EmbeddedConfig, build_default
    from oreo_fast.pipeline.sft import SFTConfig, run_sft

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    default = out / "default"

    def build():
        build_default(EmbeddedConfig(out=str(default)))
        write_demo_splits(default, config.n_val, config.n_test)

    _stage("embedded default", default / TEST_FILE, config.reuse, times, build)
    _stage("sft", out / "sft" / "config.json", config.reuse, times, lambda: run_sft(
        SFTConfig(model=str(default / "model"), train=str(default / "sft.jsonl"),
                  out=str(out / "sft"), **EMBEDDED_SFT, seed=config.sft_seed,
                  device=config.device, dtype=config.dtype)))
    seeds = [run_seed(config, out, seed, times)
             for seed in range(config.first_seed, config.first_seed + config.seeds)]

    def over_seeds(field: str) -> dict:  # method -> [value of each seed that has it]
        return {m: [getattr(r, field)[m] for r in seeds if m in getattr(r, field)]
                for m in METHODS}

    per_seed, outcomes = over_seeds("accuracy"), over_seeds("correct")
    accuracy = {m: sum(v) / len(v) for m, v in per_seed.items()}
    val_accuracy = {m: sum(v) / len(v) for m, v in over_seeds("val_accuracy").items()}
    beam = {**seeds[0].beam, "per_seed_test": per_seed["oreo_beam"]}
    results = {**accuracy, "n_problems": len(outcomes["sft"][0]), "split": "test (held out)",
               "seeds": config.seeds, "first_seed": config.first_seed,
               "sft_seed": config.sft_seed, "per_seed": per_seed,
               "validation": val_accuracy, "oreo_beam_search": beam,
               **uncertainty(outcomes),
               "samples_per_problem": config.samples_per_problem,
               "seconds": times, "oreo_overrides": config.oreo_overrides,
               "rft_overrides": config.rft_overrides, "nproc": config.nproc,
               "threads": config.threads, "rft_threads": config.rft_threads,
               "stage_threads": config.stage_threads,
               **machine_facts()}
    if config.iterate > 1:
        results["iterate"] = demo_iterate(config, out, results, times)
    write_json(out / "results.json", results)
    bar_chart(accuracy, out / "results.png")
    print(format_table(results))
    return results


def demo_iterate(config: DemoConfig, out: Path, results: dict, times: dict) -> dict:
    """Iterated RFT and iterated OREO (the paper's Figure 2): the first seed's RFT and OREO are
    round 1; each further round samples from the last round's policy and trains on those
    samples (OREO with the round's starting policy as its reference and so a fresh value
    model: ``run_iterate``'s "auto"). Every round's policy is evaluated greedily on the test
    set."""
    from oreo_fast.pipeline.iterate import IterateConfig, run_iterate

    run = seed_dir(out, config.first_seed)
    default, curves = out / "default", {}
    for name, overrides, nproc, threads in (
            ("rft", ["algorithm=rft", *config.rft_overrides], 1, config.rft_threads),
            ("oreo", config.oreo_overrides, config.nproc, config.threads)):
        t0 = time.time()
        report = run_iterate(IterateConfig(
            policy=str(run / name / "policy"),
            problems=str(default / "train.jsonl"), out=str(out / "iterate" / name),
            rounds=config.iterate - 1, k=config.samples_per_problem,
            max_new_tokens=EMBEDDED_MAX_NEW_TOKENS, eval_problems=str(default / TEST_FILE),
            nproc=nproc, threads=threads, device=config.device, dtype=config.dtype,
            seed=config.first_seed + 100, train_overrides=overrides))
        curves[name] = [results["per_seed"][name][0]] + [r["greedy_accuracy"]
                                                         for r in report["rounds"]]
        times[f"iterate {name}"] = round(time.time() - t0, 1)
        print(f"[demo] iterated {name}: test accuracy by round {curves[name]}", flush=True)
    return {"rounds": config.iterate, "sft": results["per_seed"]["sft"][0],
            "test_accuracy_by_round": curves,
            "note": "round 1 is the first seed's run; later rounds sample with seeds "
                    f"{config.first_seed + 100}, ... and train from the previous round"}


PAIRED = (("oreo", "rft"), ("oreo", "sft"), ("rft", "sft"), ("oreo_beam", "oreo"))


def uncertainty(correct: dict[str, list[list[int]]]) -> dict:
    """``correct[method][seed][problem]``: per method, the standard error of its mean test
    accuracy (``stats.summarize``: over problems and seeds); per pair in ``PAIRED``, the
    paired difference with a 95% bootstrap interval over problems and seeds."""
    summaries = {name: summarize(c) for name, c in correct.items()}
    return {
        "standard_errors": {name: s.se for name, s in summaries.items()},
        "paired_differences": {f"{a} - {b}": paired_difference(correct[a], correct[b])
                               for a, b in PAIRED if a in correct and b in correct},
    }


def machine_facts() -> dict:
    """What a result depends on besides the code: the device (the CPU model), the torch and
    transformers versions, and the date."""
    import torch
    import transformers

    return {"device": _device_name(), "torch": torch.__version__,
            "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d")}


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]} ({len(names)} cores)" if names else platform.machine()
    except OSError:
        return platform.machine()
