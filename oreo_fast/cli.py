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

from oreo_fast.config import add_config_flags, config_from_args
from oreo_fast.errors import USER_ERRORS


def cmd_task(args):
    from oreo_fast.pipeline.embedded import write_task
    from oreo_fast.tasks.arithmetic import ArithmeticConfig

    paths = write_task(args.out, config_from_args(args, ArithmeticConfig))
    print(json.dumps({k: str(v) for k, v in paths.items()}))


def cmd_init(args):
    from oreo_fast.models import TinyModelConfig
    from oreo_fast.pipeline.embedded import EmbeddedConfig, build_default
    from oreo_fast.tasks.arithmetic import ArithmeticConfig

    cfg = config_from_args(args, EmbeddedConfig, task=config_from_args(args, ArithmeticConfig),
                           model=config_from_args(args, TinyModelConfig, seed=args.seed))
    paths = build_default(cfg)
    print(json.dumps({k: str(v) for k, v in paths.items()}))


def cmd_sft(args):
    from oreo_fast.pipeline.sft import SFTConfig, run_sft

    print(run_sft(config_from_args(args, SFTConfig)))


def cmd_sample(args):
    from oreo_fast.pipeline.sample import SampleConfig, run_sample

    print(run_sample(config_from_args(args, SampleConfig)))


def cmd_eval(args):
    from oreo_fast.pipeline.evaluate import EvalConfig, run_eval

    config = config_from_args(args, EvalConfig)
    report = run_eval(config)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))


def build_parser() -> argparse.ArgumentParser:
    from oreo_fast.models import TinyModelConfig
    from oreo_fast.pipeline.demo import DemoConfig
    from oreo_fast.pipeline.embedded import EmbeddedConfig
    from oreo_fast.pipeline.evaluate import EvalConfig
    from oreo_fast.pipeline.iterate import IterateConfig
    from oreo_fast.pipeline.sample import SampleConfig
    from oreo_fast.pipeline.sft import SFTConfig
    from oreo_fast.tasks.arithmetic import ArithmeticConfig

    parser = argparse.ArgumentParser(
        prog="oreo-fast", description="OREO pipeline: embedded task and model, SFT, sampling, "
        "evaluation, OREO and RFT training, iterative OREO, the demo.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (default 0: torch's default, or "
                        "OMP_NUM_THREADS when set; the demo alone defaults to 1, the tiny "
                        "model's fastest)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("task", help="write synthetic train/test problem files (GSM8K shape)",
                       description="Write OUT/train.jsonl and OUT/test.jsonl: the synthetic "
                       "multi-step arithmetic task, in GSM8K's JSONL shape.")
    p.add_argument("--out", required=True, help="folder to write train.jsonl and test.jsonl to")
    add_config_flags(p, ArithmeticConfig)
    p.set_defaults(func=cmd_task)

    p = sub.add_parser("init", help="build the embedded default: problems, tokenizer, tiny model",
                       description="Build the embedded default under OUT: train.jsonl, "
                       "test.jsonl, tokenizer/ and model/ (a random-init tiny Qwen2).")
    add_config_flags(p, EmbeddedConfig, skip=("task", "model"))
    add_config_flags(p, ArithmeticConfig)
    add_config_flags(p, TinyModelConfig, skip=("seed",))
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("sft", help="supervised fine-tuning on gold solutions",
                       description="Cross-entropy on response tokens of prompt + gold "
                       "solution; writes a checkpoint folder with sft_log.json.")
    add_config_flags(p, SFTConfig)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("sample", help="sample K verified responses per problem (trajectories)",
                       description="Sample K responses per problem with a KV cache, verify "
                       "them and write {prompt, response, reward, problem_id} JSONL.")
    add_config_flags(p, SampleConfig)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="greedy and n-sample accuracy, as a JSON report",
                       description="Greedy accuracy and, with --n-samples, sample accuracy, "
                       "pass@n and majority@n; writes a JSON report.")
    add_config_flags(p, EvalConfig)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="OREO or RFT training (the same as python -m oreo_fast.train)",
                       description="Train with a TrainConfig from --config and key=value "
                       "overrides; for several processes use torchrun -m oreo_fast.train.",
                       add_help=False)  # --help and the rest go to the trainer's parser
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("iterate", help="iterative OREO: rounds of sample -> train",
                       description="Rounds of sampling from the current policy and OREO "
                       "training from it; key=value after -- go to the trainer.")
    add_config_flags(p, IterateConfig, skip=("train_overrides",))
    p.add_argument("train_overrides", nargs="*", help="key=value overrides for the trainer")
    p.set_defaults(func=cmd_iterate)

    p = sub.add_parser("demo", help="the paper's comparison on the embedded default (make demo)",
                       description="Embedded default -> SFT -> sampling -> RFT and OREO -> "
                       "held-out accuracy table, results.json and a bar chart.")
    add_config_flags(p, DemoConfig, skip=("threads", "oreo_overrides", "rft_overrides"))
    p.set_defaults(func=cmd_demo)
    return parser


def cmd_train(args):
    from oreo_fast.train.trainer import main as train_main

    train_main(args.rest)


def cmd_iterate(args):
    from oreo_fast.pipeline.iterate import IterateConfig, run_iterate

    config = config_from_args(args, IterateConfig, train_overrides=args.train_overrides)
    print(json.dumps(run_iterate(config)["rounds"], indent=2))


def cmd_demo(args):
    from oreo_fast.pipeline.demo import DemoConfig, run_demo

    # --threads N: N threads everywhere (the training processes and the in-process stages)
    run_demo(config_from_args(args, DemoConfig, threads=args.threads or 1,
                              **({"stage_threads": args.threads} if args.threads else {})))


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
    try:
        args.func(args)
    except USER_ERRORS as e:
        print(f"oreo-fast: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
