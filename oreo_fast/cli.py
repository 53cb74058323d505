"""``oreo-fast``: one console script, one subcommand per job.

Each subcommand only turns its arguments into the job's dataclass config and calls the job
function (``build_default``, ``run_sft``, ``run_sample``, ``run_eval``), so everything the
CLI does can be done from Python the same way.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import MISSING, fields

from oreo_fast.jsonl import DataError


def _add_config_args(parser: argparse.ArgumentParser, config_cls, skip=(), helps=None):
    """One ``--flag`` per dataclass field (underscores become dashes), typed by its annotation;
    fields without a default are required."""
    helps = helps or {}
    for f in fields(config_cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        text = helps.get(f.name, "")
        if f.default is MISSING:
            parser.add_argument(flag, dest=f.name, required=True, help=text)
        elif isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=f.default, help=text)
        elif isinstance(f.default, tuple):
            parser.add_argument(flag, dest=f.name, nargs="+", default=list(f.default),
                                help=f"{text} (default: {' '.join(map(str, f.default))})".strip())
        else:
            typ = float if "float" in kind else int if "int" in kind else str
            parser.add_argument(flag, dest=f.name, type=typ, default=f.default,
                                help=f"{text} (default: {f.default})".strip())


def _config_from(args, config_cls, **extra):
    values = {f.name: getattr(args, f.name) for f in fields(config_cls) if hasattr(args, f.name)}
    values.update(extra)
    for f in fields(config_cls):
        if isinstance(f.default, tuple) and isinstance(values.get(f.name), list):
            values[f.name] = tuple(values[f.name])
    return config_cls(**values)


def cmd_task(args):
    from oreo_fast.embedded import write_task
    from oreo_fast.tasks.arithmetic import ArithmeticConfig

    paths = write_task(args.out, _config_from(args, ArithmeticConfig))
    print(json.dumps({k: str(v) for k, v in paths.items()}))


def cmd_init(args):
    from oreo_fast.embedded import EmbeddedConfig, build_default
    from oreo_fast.models import TinyModelConfig
    from oreo_fast.tasks.arithmetic import ArithmeticConfig

    cfg = EmbeddedConfig(out=args.out, task=_config_from(args, ArithmeticConfig),
                         model=_config_from(args, TinyModelConfig, seed=args.seed),
                         vocab_size=args.vocab_size)
    paths = build_default(cfg)
    print(json.dumps({k: str(v) for k, v in paths.items()}))


def cmd_sft(args):
    from oreo_fast.sft import SFTConfig, run_sft

    print(run_sft(_config_from(args, SFTConfig)))


def cmd_sample(args):
    from oreo_fast.sample import SampleConfig, run_sample

    print(run_sample(_config_from(args, SampleConfig)))


def cmd_eval(args):
    from oreo_fast.evaluate import EvalConfig, run_eval

    try:
        config = _config_from(args, EvalConfig)
    except ValueError as e:  # bad search arguments: a message, not a traceback
        raise DataError(str(e)) from None
    report = run_eval(config)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))


def build_parser() -> argparse.ArgumentParser:
    from oreo_fast.evaluate import EvalConfig
    from oreo_fast.iterate import IterateConfig
    from oreo_fast.models import TinyModelConfig
    from oreo_fast.sample import SampleConfig
    from oreo_fast.sft import SFTConfig
    from oreo_fast.tasks.arithmetic import ArithmeticConfig

    parser = argparse.ArgumentParser(
        prog="oreo-fast", description="OREO pipeline: embedded task and model, SFT, sampling, "
        "evaluation, OREO and RFT training, iterative OREO, the demo.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default: 1; tiny models run fastest on "
                        "one thread, especially on a shared machine; 0 keeps torch's default)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("task", help="write synthetic train/test problem files (GSM8K shape)",
                       description="Write OUT/train.jsonl and OUT/test.jsonl: the synthetic "
                       "multi-step arithmetic task, in GSM8K's JSONL shape.")
    p.add_argument("--out", required=True, help="folder to write train.jsonl and test.jsonl to")
    _add_config_args(p, ArithmeticConfig)
    p.set_defaults(func=cmd_task)

    p = sub.add_parser("init", help="build the embedded default: problems, tokenizer, tiny model",
                       description="Build the embedded default under OUT: train.jsonl, "
                       "test.jsonl, tokenizer/ and model/ (a random-init tiny Qwen2).")
    p.add_argument("--out", required=True, help="folder to build into")
    p.add_argument("--vocab-size", type=int, default=384, help="BPE vocabulary size (default: 384)")
    _add_config_args(p, ArithmeticConfig)
    _add_config_args(p, TinyModelConfig, skip=("seed",))
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("sft", help="supervised fine-tuning on gold solutions",
                       description="Cross-entropy on response tokens of prompt + gold "
                       "solution; writes a checkpoint folder with sft_log.json.")
    _add_config_args(p, SFTConfig, helps={"model": "checkpoint folder to start from",
                                          "train": "problem JSONL", "out": "folder to write"})
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("sample", help="sample K verified responses per problem (trajectories)",
                       description="Sample K responses per problem with a KV cache, verify "
                       "them and write {prompt, response, reward, problem_id} JSONL.")
    _add_config_args(p, SampleConfig, helps={"model": "policy checkpoint folder",
                                             "problems": "problem JSONL",
                                             "out": "trajectory JSONL to write",
                                             "balance": "at most N positive and N negative "
                                                        "per problem"})
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="greedy and n-sample accuracy, as a JSON report",
                       description="Greedy accuracy and, with --n-samples, sample accuracy, "
                       "pass@n and majority@n; writes a JSON report.")
    _add_config_args(p, EvalConfig, helps={"model": "policy checkpoint folder",
                                           "problems": "problem JSONL",
                                           "out": "JSON report to write",
                                           "predictions": "also write greedy responses here",
                                           "value": "value model folder for --beams / --best-of",
                                           "beams": "value-guided beam search with B beams",
                                           "candidates": "K sampled next steps per beam",
                                           "distinct_beams": "identical candidates take one "
                                                             "beam place",
                                           "kv_sharing": "beam children's KV: cascade (read "
                                                         "in place) or copy",
                                           "best_of": "best-of-N samples picked by value"})
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="OREO or RFT training (the same as python -m oreo_fast.train)",
                       description="Train with a TrainConfig from --config and key=value "
                       "overrides; for several processes use torchrun -m oreo_fast.train.",
                       add_help=False)  # --help and the rest go to the trainer's parser
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("iterate", help="iterative OREO: rounds of sample -> train",
                       description="Rounds of sampling from the current policy and OREO "
                       "training from it; key=value after -- go to the trainer.")
    _add_config_args(p, IterateConfig, skip=("train_overrides",),
                     helps={"policy": "starting policy folder", "problems": "problem JSONL",
                            "out": "folder for the rounds"})
    p.add_argument("train_overrides", nargs="*", help="key=value overrides for the trainer")
    p.set_defaults(func=cmd_iterate)

    p = sub.add_parser("demo", help="the paper's comparison on the embedded default (make demo)",
                       description="Embedded default -> SFT -> sampling -> RFT and OREO -> "
                       "held-out accuracy table, results.json and a bar chart.")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--nproc", type=int, default=2, help="OREO training processes (default: 2)")
    p.add_argument("--samples-per-problem", type=int, default=8)
    p.add_argument("--reuse", action="store_true", help="keep finished stages found in --out")
    p.set_defaults(func=cmd_demo)
    return parser


def cmd_train(args):
    from oreo_fast.train import main as train_main

    train_main(args.rest)


def cmd_iterate(args):
    from oreo_fast.iterate import IterateConfig, run_iterate

    values = {f.name: getattr(args, f.name) for f in fields(IterateConfig)}
    print(json.dumps(run_iterate(IterateConfig(**values))["rounds"], indent=2))


def cmd_demo(args):
    from oreo_fast.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=args.out, nproc=args.nproc, reuse=args.reuse, threads=args.threads or 1,
                        samples_per_problem=args.samples_per_problem))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        args.rest = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars would drown our own
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    from oreo_fast.config import ConfigError
    from oreo_fast.faults import NonFiniteError

    try:
        args.func(args)
    except (DataError, ConfigError, NonFiniteError) as e:
        print(f"oreo-fast: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
