"""The OREO trainer's loop. One command on one CPU or many GPUs:

    torchrun --nproc_per_node=N -m oreo_fast.train --config FILE [key=value ...]
    python -m oreo_fast.train --config FILE [key=value ...]        # single process

Per optimizer step: the algorithm's micro-step (``step.py``) on each of this rank's
micro-batches with one backward each, then gradient clipping, the non-finite guard, one
host synchronisation for all metrics, and each optimizer's step. Model loading and sharding
live in ``step.py`` / ``parallelize.py``, saving and resuming in ``checkpoint.py``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from oreo_fast.errors import USER_ERRORS
from oreo_fast.tokenizer import load_tokenizer
from oreo_fast.train import guard
from oreo_fast.train.checkpoint import Checkpointer, check_run_inputs
from oreo_fast.train.config import TrainConfig, load_train_config, save_config
from oreo_fast.train.data import (collate_examples, plan_global_batches, rank_micro_batches,
                                  read_training_examples)
from oreo_fast.train.distributed import exit_with_launcher, quiet_transformers_unless_main, set_up
from oreo_fast.train.export import export_models
from oreo_fast.train.lora import trainable
from oreo_fast.train.metrics import MetricSinks, plot_curves, write_history
from oreo_fast.train.parallelize import apply_liger, attention_backend, data_parallel_mesh
from oreo_fast.train.schedule import cosine_with_warmup, warmup_steps_for
from oreo_fast.train.step import PER_SEQUENCE_MEANS, build_step


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = cfg = config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.runtime = set_up(cfg.dtype, cfg.collective_timeout_s, cfg.device)
        self.device, self.rank = self.runtime.device, self.runtime.rank
        quiet_transformers_unless_main(self.rank)
        self.world_size = self.runtime.world_size
        self.output_dir = Path(cfg.output_dir)
        check_run_inputs(cfg, self.output_dir)
        torch.manual_seed(cfg.seed)
        self.tokenizer = load_tokenizer(cfg.policy, trust_remote_code=cfg.trust_remote_code)
        if cfg.liger:
            apply_liger(cfg.policy, self.device)
        self.checkpointer = Checkpointer(cfg, self.output_dir, self.runtime)
        load_kwargs = dict(device=self.device, dtype=torch.float32,
                           trust_remote_code=cfg.trust_remote_code,
                           attn_implementation=attention_backend(cfg.attn_implementation,
                                                                 self.device))
        self.algorithm = build_step(cfg, *self.checkpointer.model_inits(), load_kwargs,
                                    self.runtime.compute_dtype)
        trained = self.algorithm.trained  # already on self.device (models.load_model)
        if self.runtime.use_fsdp:
            mesh = data_parallel_mesh(self.device, self.world_size, cfg.dp_replicate)
            self.algorithm.shard(self.runtime.compute_dtype, mesh=mesh)
        lrs = (cfg.policy_lr, cfg.value_lr)
        self.optimizers = []
        for module, lr in zip(trained, lrs):
            module.train()
            # LoRA: the adapters (and the value head) only; else every parameter
            self.optimizers.append(torch.optim.AdamW(trainable(module), lr=lr,
                                                     betas=tuple(cfg.adam_betas),
                                                     weight_decay=cfg.weight_decay))
        examples, self.dropped = read_training_examples(
            cfg.train_file, self.tokenizer, cfg.max_length, cfg.step_delimiters, cfg.strict,
            cfg.prompt_format, cfg.keep_truncated)
        self.examples = self.algorithm.select(examples, cfg.train_file)
        self.lengths = [len(e.ids) for e in self.examples]
        self.total_steps = math.ceil(len(self.examples) / cfg.global_batch_size) * cfg.epochs
        factor = cosine_with_warmup(self.total_steps,
                                    warmup_steps_for(self.total_steps, cfg.warmup_ratio),
                                    cfg.min_lr_ratio)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in self.optimizers]
        self.progress = self.checkpointer.restore(trained, self.optimizers, self.schedulers)

    @property
    def planned_steps(self) -> int:
        """Optimizer steps this run will take: the schedule's, or ``max_steps`` when lower."""
        cap = self.config.max_steps
        return min(self.total_steps, cap) if cap else self.total_steps

    # ------------------------------------------------------------------ one step

    def train_step(self, batch_indices: list[int]) -> dict:
        cfg, trained, progress = self.config, self.algorithm.trained, self.progress
        micro_batches = rank_micro_batches(batch_indices, self.lengths, self.world_size,
                                           self.rank, cfg.micro_batch_size)
        totals: dict[str, torch.Tensor] = {}
        tokens = 0
        for i, micro in enumerate(micro_batches):
            if self.runtime.use_fsdp and cfg.accumulate_unsharded:
                # one reduce-scatter per step, full-size gradients held until the last one
                for module in trained:
                    module.set_requires_gradient_sync(i == len(micro_batches) - 1)
            batch = collate_examples([None if j is None else self.examples[j] for j in micro],
                                     self.tokenizer.pad_token_id, cfg.level)
            tokens += int(batch["attention_mask"].sum())
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self.algorithm.gathered():
                loss, metrics = self.algorithm(batch, len(batch_indices))
                # FSDP averages gradients over ranks; the loss is already a global mean
                (loss * self.world_size).backward()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0) + v.float()
        norms = []
        for module in trained:
            norm = torch.nn.utils.clip_grad_norm_(trainable(module), cfg.grad_clip or float("inf"))
            norms.append((norm.full_tensor() if hasattr(norm, "full_tensor") else norm).float())
        norms = torch.stack(norms).to(self.device)
        # non-finite guard, on device: this rank's loss and the (global) gradient norms
        bad = ~(torch.isfinite(totals["loss"]) & torch.isfinite(norms).all())
        keys = sorted(totals)
        stacked = torch.stack([totals[k] for k in keys] + [
            torch.tensor(float(tokens), device=self.device), bad.float()])
        if self.runtime.distributed:
            dist.all_reduce(stacked)  # a bad step on any rank is bad on all
        # the step's one host synchronisation: metrics, gradient norms and the flag together
        reduced = torch.cat([stacked, norms]).tolist()
        values = dict(zip(keys + ["tokens", "bad_ranks"], reduced))
        finite = values.pop("bad_ranks") == 0
        for optimizer, scheduler in zip(self.optimizers, self.schedulers):
            if finite:  # a non-finite step leaves parameters and Adam moments untouched
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()  # the schedule follows the data position, skipped or not
        progress.step += 1
        progress.bad_in_row = 0 if finite else progress.bad_in_row + 1
        progress.skipped_steps += not finite
        values["skipped"] = int(not finite)
        values["skipped_steps"] = progress.skipped_steps
        n = max(values.pop("sequences"), 1.0)
        for k in PER_SEQUENCE_MEANS:
            if k in values:
                values[k] /= n
        values.update(zip(self.algorithm.grad_norm_names, reduced[len(stacked):]))
        values["policy_lr"] = self.schedulers[0].get_last_lr()[0]
        return values

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        cfg, progress = self.config, self.progress
        main = self.runtime.is_main
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output_dir / "config.json")
        bar = None
        if main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.planned_steps, initial=progress.step,
                       desc=f"{cfg.algorithm} train", dynamic_ncols=True)
        sinks = MetricSinks(cfg, self.output_dir, enabled=main)
        start = time.time()
        done = progress.step  # global batches already trained (a resumed run skips them)
        seen = 0
        for epoch in range(cfg.epochs):
            for batch_indices in plan_global_batches(len(self.examples), cfg.global_batch_size,
                                                     cfg.seed, epoch):
                seen += 1
                if seen <= done:
                    continue
                if cfg.max_steps and progress.step >= cfg.max_steps:
                    break
                t0 = time.time()
                values = self.train_step(batch_indices)
                elapsed = time.time() - t0
                values.update(step=progress.step, epoch=epoch, seconds=elapsed,
                              tokens_per_second=values["tokens"] / max(elapsed, 1e-9),
                              peak_memory_mb=self._peak_memory_mb())
                progress.history.append(values)
                sinks.log(values, progress.step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{values['loss']:.4f}",
                                    tok_s=f"{values['tokens_per_second']:.0f}")
                if values["skipped"]:
                    guard.bad_step(progress.step, progress.bad_in_row, progress.skipped_steps,
                                   cfg.max_bad_steps, warn=main)
                if self.checkpointer.due(progress.step):
                    self.save_checkpoint()
                if cfg.export_every and progress.step % cfg.export_every == 0:
                    self.export()
                guard.inject(progress.step, self.rank)
        if bar is not None:
            bar.close()
        self.checkpointer.close()  # an async save still in flight is committed first
        sinks.close()
        if main:
            write_history(progress.history, self.output_dir / "metrics.jsonl")
        if not (cfg.export_every and progress.step % cfg.export_every == 0):
            self.export()  # else the loop has just exported this step
        if main:
            plot_curves(progress.history, self.output_dir / "curves.png")
        history = progress.history
        return {"steps": progress.step, "seconds": time.time() - start,
                "examples": len(self.examples), "dropped_too_long": self.dropped.too_long,
                "dropped_truncated": self.dropped.truncated,
                "world_size": self.world_size, "final": history[-1] if history else {}}

    def export(self, out_dir: Path | None = None) -> None:
        """``policy/`` and ``value/`` (Hugging Face folders, committed as a pair) in
        ``out_dir`` or ``output_dir``, in ``export_dtype``; NaN/Inf is never written."""
        out_dir = self.output_dir if out_dir is None else Path(out_dir)
        trained, step = self.algorithm.trained, self.progress.step
        self.checkpointer.check_finite(trained, self.optimizers, step, f"the models in {out_dir}")
        dtype = {"auto": self.runtime.compute_dtype, "float32": torch.float32,
                 "bfloat16": torch.bfloat16}[self.config.export_dtype]
        export_models(trained, self.tokenizer, out_dir, step, dtype, self.runtime.is_main,
                      adapters_only=self.config.lora_export == "adapter")
        if self.runtime.distributed:
            dist.barrier()

    def save_checkpoint(self) -> None:
        self.checkpointer.save(self.algorithm.trained, self.optimizers, self.schedulers,
                               self.progress)

    def _peak_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oreo-fast train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON or TOML file of TrainConfig keys")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = parser.parse_args(argv)
    exit_with_launcher()
    try:
        config = load_train_config(args.config, args.overrides)
        trainer = Trainer(config)
        summary = trainer.fit()
    except USER_ERRORS as e:
        # every rank meets these alike; one line each, no stack trace, exit status 2
        rank = os.environ.get("RANK")
        print(f"oreo-fast train: error{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr)
        sys.exit(2)
    except torch.OutOfMemoryError as e:
        rank = os.environ.get("RANK")
        first = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
        print(f"oreo-fast train: error{f' (rank {rank})' if rank else ''}: out of memory "
              f"({first[:200]}); lower micro_batch_size (now {config.micro_batch_size}) or set "
              "gradient_checkpointing=true, or train on more GPUs", file=sys.stderr)
        sys.exit(3)
    if trainer.rank == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "final"}))
    if dist.is_initialized():
        # every rank reaches teardown before any destroys the group: a rank tearing gloo down
        # while rank 0 still writes its outputs was seen to abort ("terminate called without
        # an active exception", 1 of 4 fresh-clone test runs)
        dist.barrier()
        dist.destroy_process_group()
    return 0
