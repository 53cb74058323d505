"""The OREO trainer. One command on one CPU or many GPUs:

    torchrun --nproc_per_node=N -m oreo_fast.train --config FILE [key=value ...]
    python -m oreo_fast.train --config FILE [key=value ...]        # single process

Per optimizer step: for each micro-batch, one policy forward with gradient (its detached
log-ratios also give the value targets: the paper's second, gradient-free policy forward
computes the same numbers), one reference forward without gradient, one value forward, the
fused hidden-level OREO loss (logits never materialised), one backward for both models.
Policy and value are wrapped with FSDP2 ``fully_shard`` per decoder block, then the root; the
reference's blocks are sharded too, its embedding / LM head stay replicated (frozen, needed
whole by the fused loss). Losses are normalised by the global number of sequences, so results
do not depend on the world size or the micro-batch split. ``algorithm=rft`` trains the
rejection-sampling baseline (cross-entropy on the reward-1 trajectories) with the same loop.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from oreo_fast import checkpoint, faults, ops, reference
from oreo_fast.config import ConfigError, TrainConfig, load_config, save_config
from oreo_fast.data import collate, plan_global_batches, rank_micro_batches, read_trajectories
from oreo_fast.faults import NonFiniteError
from oreo_fast.jsonl import DataError, atomic_dir, atomic_open
from oreo_fast.models import ValueModel, load_policy
from oreo_fast.tokenizer import load_tokenizer


class PolicyWithLoss(nn.Module):
    """The policy whose forward returns per-token (logp, ref_logp, kl) through the fused op.

    The loss runs inside this module's forward so that, under FSDP2, the root's parameters
    (embedding, final norm, LM head) are unsharded while the fused op reads the LM head, and
    stay so until its backward (FSDP2 does not reshard the root after forward).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, actions, action_mask,
                ref_hidden=None, ref_weight=None, compute_kl=True, impl="auto"):
        hidden = self.model.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        ).last_hidden_state[:, :-1]
        weight = self.model.get_output_embeddings().weight
        if ref_hidden is None:  # rft: the reference side is the policy itself, no KL
            ref_hidden, ref_weight, compute_kl = hidden.detach(), weight.detach(), False
        return ops._fused_linear_token_logprobs_kl(
            hidden, weight, ref_hidden.to(hidden.dtype), ref_weight.to(weight.dtype),
            actions, action_mask, compute_kl=compute_kl, impl=impl,
        )


class HiddenStates(nn.Module):
    """The reference as an FSDP root: final-norm hidden states at the action positions."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids):
        return self.model.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        ).last_hidden_state[:, :-1]


class Values(nn.Module):
    """The value model as an FSDP root returning a plain tensor, V(s_t) for t < L - 1 (FSDP2
    hooks the backward through the forward's output tensors)."""

    def __init__(self, value_model: ValueModel):
        super().__init__()
        self.value_model = value_model

    def forward(self, input_ids, attention_mask, position_ids):
        values = self.value_model(input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids).values
        return values[:, :-1].clone()  # not a view: FSDP2 hooks its backward on this tensor


def _blocks(model: nn.Module):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder .layers to shard")
    return layers


def shard(module: nn.Module, model: nn.Module, mp_policy, ignored=None):
    """FSDP2: each decoder block, then the root (``ignored`` parameters stay replicated)."""
    from torch.distributed.fsdp import fully_shard

    for block in _blocks(model):
        fully_shard(block, mp_policy=mp_policy)
    fully_shard(module, mp_policy=mp_policy, ignored_params=ignored)


def cosine_with_warmup(total_steps: int, warmup_ratio: float, min_ratio: float):
    warmup = max(1, math.ceil(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def init_process_group_per_attempt(backend: str, timeout: datetime.timedelta) -> None:
    """``init_process_group`` from torchrun's environment, each restart on keys of its own.

    torchrun's default (static) rendezvous keeps one store across ``--max-restarts`` attempts,
    and ``env://`` adds no per-attempt prefix (torch 2.13), so a restarted rank can read a
    dead rank's gloo address or NCCL id from the previous attempt: "Connection refused".
    """
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"oreo_fast/attempt_{attempt}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timeout)


def exit_with_launcher(poll_s: float = 0.1) -> None:
    """Under torchrun, end this worker as soon as its launcher is gone.

    torchrun starts each worker in a session of its own, so killing the launcher (``kill -9``,
    even of its whole process group) leaves the workers running: they would go on training,
    saving and pruning checkpoints next to a restarted run that resumes from them. A daemon
    thread watches the parent pid; once the worker is re-parented it exits at once, which
    the atomic checkpoint writes make safe at any point.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()

    def watch():
        while os.getppid() == launcher:
            time.sleep(poll_s)
        print(f"oreo-fast train: the launcher (pid {launcher}) is gone; exiting",
              file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="oreo-fast-launcher-watch", daemon=True).start()


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        master, self.compute_dtype = self._dtypes()
        # bf16 compute always goes through FSDP2's mixed precision (fp32 master weights and
        # reductions), in a one-process group when not launched by torchrun
        self.use_fsdp = self.distributed or self.compute_dtype != master
        if self.use_fsdp and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            # bounded: a dead or stuck rank makes the others fail instead of hanging
            timeout = datetime.timedelta(seconds=config.collective_timeout_s)
            if self.distributed:
                init_process_group_per_attempt(backend, timeout)
            else:
                store = dist.HashStore()
                dist.init_process_group(backend, store=store, rank=0, world_size=1,
                                        timeout=timeout)
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.output_dir = Path(config.output_dir)
        self._build()

    # ------------------------------------------------------------------ setup

    def _dtypes(self):
        cfg = self.config
        compute = torch.bfloat16 if (cfg.dtype == "bfloat16" or (
            cfg.dtype == "auto" and self.device.type == "cuda")) else torch.float32
        return torch.float32, compute  # fp32 master weights, compute dtype

    def _attn(self) -> str:
        if self.config.attn_implementation != "auto":
            return self.config.attn_implementation
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2" if self.device.type == "cuda" else "sdpa"
        except ImportError:
            return "sdpa"

    def _build(self):
        cfg = self.config
        faults.check_train_inputs(cfg, self.output_dir)
        torch.manual_seed(cfg.seed)
        self.tokenizer = load_tokenizer(cfg.policy, trust_remote_code=cfg.trust_remote_code)
        if cfg.liger:
            self._apply_liger()
        master, compute = torch.float32, self.compute_dtype
        kw = dict(dtype=master, trust_remote_code=cfg.trust_remote_code,
                  attn_implementation=self._attn())
        found = checkpoint.list_checkpoints(self.output_dir / "checkpoints") if cfg.resume else []
        self.resume_from = found[-1][1] if found else None
        policy_init = self.resume_from / "policy" if self.resume_from else cfg.policy
        value_init = self.resume_from / "value" if self.resume_from else (cfg.value or cfg.policy)
        policy = load_policy(policy_init, **kw)
        self.policy = PolicyWithLoss(policy)
        self.oreo = cfg.algorithm == "oreo"
        if self.oreo:
            reference_model = load_policy(cfg.reference or cfg.policy, **{**kw, "dtype": compute})
            reference_model.requires_grad_(False)
            value_model = ValueModel.from_pretrained(value_init, **kw)
            faults.check_same_vocabulary({
                "policy": (Path(cfg.policy), policy.config),
                "reference": (Path(cfg.reference or cfg.policy), reference_model.config),
                "value": (Path(value_init), value_model.config)})
            self.reference, self.value = HiddenStates(reference_model), Values(value_model)
        if cfg.gradient_checkpointing:
            for model in [policy] + ([value_model.backbone] if self.oreo else []):
                # transformers 5 renamed it; the old name is deprecated
                enable = getattr(model, "activation_checkpointing_enable", None) or \
                    model.gradient_checkpointing_enable
                enable()
        for module in self._modules():
            module.to(self.device)
        if self.use_fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
            shard(self.policy, policy, mp)
            if self.oreo:
                shard(self.value, value_model.backbone, mp)
                # frozen: blocks sharded, embedding and LM head replicated for the fused loss
                frozen = {reference_model.get_output_embeddings().weight,
                          reference_model.get_input_embeddings().weight}
                shard(self.reference, reference_model, MixedPrecisionPolicy(param_dtype=compute),
                      ignored=frozen)
        self.policy.train()
        betas = tuple(cfg.adam_betas)
        self.optimizers = [torch.optim.AdamW(self.policy.parameters(), lr=cfg.policy_lr,
                                             betas=betas, weight_decay=cfg.weight_decay)]
        if self.oreo:
            self.value.train()
            self.optimizers.append(torch.optim.AdamW(self.value.parameters(), lr=cfg.value_lr,
                                                     betas=betas, weight_decay=cfg.weight_decay))
        examples, self.dropped = read_trajectories(cfg.train_file, self.tokenizer, cfg.max_length,
                                                   cfg.step_delimiters, cfg.strict)
        if not self.oreo:
            examples = [e for e in examples if e.reward > 0.5]
            if not examples:
                raise ValueError(f"{cfg.train_file}: no reward-1 trajectory for rft")
        self.examples = examples
        self.lengths = [len(e.ids) for e in examples]
        self.steps_per_epoch = math.ceil(len(examples) / cfg.global_batch_size)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        factor = cosine_with_warmup(self.total_steps, cfg.warmup_ratio, cfg.min_lr_ratio)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in self.optimizers]
        self.step = 0
        self.skipped_steps = 0  # steps skipped for a non-finite loss or gradient
        self.bad_in_row = 0  # consecutive ones, up to now
        self.history: list[dict] = []
        if self.resume_from is not None:
            self._load_trainer_state(self.resume_from / checkpoint.STATE_DIR)

    def _modules(self):
        return [self.policy] + ([self.reference, self.value] if self.oreo else [])

    def _apply_liger(self):
        if self.device.type != "cuda":
            # Liger's kernels do not run under the Triton interpreter
            raise RuntimeError("liger=true needs a CUDA device (Liger-Kernel's Triton kernels)")
        try:
            from liger_kernel.transformers import _apply_liger_kernel
        except ImportError:
            raise RuntimeError("liger=true needs the liger-kernel package") from None
        model_type = json.loads((Path(self.config.policy) / "config.json").read_text())["model_type"]
        # patch the modelling classes before the models are built; our fused loss replaces
        # the LM-head cross-entropy, so that patch stays off
        _apply_liger_kernel(model_type, rms_norm=True, rope=True, swiglu=True,
                            cross_entropy=False, fused_linear_cross_entropy=False)

    # ------------------------------------------------------------------ one step

    def _micro_step(self, batch: dict, num_sequences: int):
        cfg = self.config
        batch = {k: v.to(self.device) for k, v in batch.items()}
        model_inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            position_ids=batch["position_ids"])
        if not self.oreo:
            logp, _, _ = self.policy(**model_inputs, actions=batch["actions"],
                                     action_mask=batch["action_mask"], impl=cfg.impl)
            m = batch["action_mask"]
            nll = reference.masked_sequence_mean(-logp, m).sum() / num_sequences
            return nll, {"loss": nll.detach(), "sequences": m.any(1).sum().float()}
        with torch.no_grad():
            ref_hidden = self.reference(**model_inputs)
        ref_weight = self.reference.model.get_output_embeddings().weight
        logp, ref_logp, kl = self.policy(
            **model_inputs, actions=batch["actions"], action_mask=batch["action_mask"],
            ref_hidden=ref_hidden, ref_weight=ref_weight,
            compute_kl=cfg.kl_estimator == "full", impl=cfg.impl)
        values = self.value(**model_inputs)
        out = reference.bellman_losses(
            logp, ref_logp, kl, values, batch["rewards"], batch["action_mask"], batch["state_mask"],
            beta=cfg.beta, kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator,
            num_sequences=num_sequences)
        n_real = batch["action_mask"].any(1).sum().float()
        # diagnostics are means over this micro-batch: weight them by its sequences (the KL
        # mean runs over every row, the padding rows adding zeros)
        metrics = {"loss": out.loss.detach(), "value_loss": out.value_loss.detach(),
                   "policy_loss": out.policy_loss.detach(), "sequences": n_real,
                   "kl": out.kl * len(batch["rewards"]), "residual_abs": out.residual_abs * n_real,
                   "first_value": out.first_value * n_real,
                   "first_advantage": out.first_advantage * n_real}
        return out.loss, metrics

    def train_step(self, batch_indices: list[int]) -> dict:
        cfg = self.config
        micro_batches = rank_micro_batches(batch_indices, self.lengths, self.world_size,
                                           self.rank, cfg.micro_batch_size)
        totals: dict[str, torch.Tensor] = {}
        tokens = 0
        for i, micro in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            if self.use_fsdp:
                for module in (self.policy, self.value) if self.oreo else (self.policy,):
                    module.set_requires_gradient_sync(last)
            batch = collate([None if j is None else self.examples[j] for j in micro],
                            self.tokenizer.pad_token_id, cfg.level)
            tokens += int(batch["attention_mask"].sum())
            loss, metrics = self._micro_step(batch, len(batch_indices))
            # FSDP averages gradients over ranks; the loss is already a global mean
            (loss * self.world_size).backward()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0) + v.float()
        norms = []
        for module in self._trained_modules():
            norm = torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip or float("inf"))
            norms.append((norm.full_tensor() if hasattr(norm, "full_tensor") else norm).float())
        norms = torch.stack(norms).to(self.device)
        # non-finite guard, on device: this rank's loss and the (global) gradient norms
        bad = ~(torch.isfinite(totals["loss"]) & torch.isfinite(norms).all())
        keys = sorted(totals)
        stacked = torch.stack([totals[k] for k in keys] + [
            torch.tensor(float(tokens), device=self.device), bad.float()])
        if self.distributed:
            dist.all_reduce(stacked)  # a bad step on any rank is bad on all
        # the step's one host synchronisation: metrics, gradient norms and the flag together
        reduced = torch.cat([stacked, norms]).tolist()
        values = dict(zip(keys + ["tokens", "bad_ranks"], reduced))
        grad_norms = reduced[len(stacked):]
        finite = values.pop("bad_ranks") == 0
        for optimizer, scheduler in zip(self.optimizers, self.schedulers):
            if finite:  # a non-finite step leaves parameters and Adam moments untouched
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()  # the schedule follows the data position, skipped or not
        self.step += 1
        self.bad_in_row = 0 if finite else self.bad_in_row + 1
        self.skipped_steps += not finite
        values["skipped"] = int(not finite)
        values["skipped_steps"] = self.skipped_steps
        n = max(values.pop("sequences"), 1.0)
        for k in ("kl", "residual_abs", "first_value", "first_advantage"):
            if k in values:
                values[k] /= n
        values["policy_grad_norm"] = grad_norms[0]
        if self.oreo:
            values["value_grad_norm"] = grad_norms[1]
        values["policy_lr"] = self.schedulers[0].get_last_lr()[0]
        return values

    # ------------------------------------------------------------------ loop and outputs

    def fit(self) -> dict:
        cfg = self.config
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output_dir / "config.json")
        metrics_path = self.output_dir / "metrics.jsonl"
        history = self.history
        bar = None
        if self.rank == 0 and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc=f"{cfg.algorithm} train",
                       dynamic_ncols=True)
        sinks = MetricSinks(cfg, self.output_dir, enabled=self.rank == 0)
        start = time.time()
        done = self.step  # global batches already trained (a resumed run skips them)
        seen = 0
        for epoch in range(cfg.epochs):
            for batch_indices in plan_global_batches(len(self.examples), cfg.global_batch_size,
                                                     cfg.seed, epoch):
                seen += 1
                if seen <= done:
                    continue
                if cfg.max_steps and self.step >= cfg.max_steps:
                    break
                t0 = time.time()
                values = self.train_step(batch_indices)
                elapsed = time.time() - t0
                values.update(step=self.step, epoch=epoch, seconds=elapsed,
                              tokens_per_second=values["tokens"] / max(elapsed, 1e-9),
                              peak_memory_mb=self._peak_memory_mb())
                history.append(values)
                sinks.log(values, self.step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{values['loss']:.4f}",
                                    tok_s=f"{values['tokens_per_second']:.0f}")
                if values["skipped"]:
                    faults.bad_step(self.step, self.bad_in_row, self.skipped_steps,
                                    cfg.max_bad_steps, warn=self.rank == 0)
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save_checkpoint()
                faults.inject(self.step, self.rank)
        if bar is not None:
            bar.close()
        sinks.close()
        if self.rank == 0:
            with atomic_open(metrics_path) as f:
                for row in history:
                    f.write(json.dumps(row) + "\n")
        self.save(self.output_dir)
        if self.rank == 0:
            plot_curves(history, self.output_dir / "curves.png")
        summary = {"steps": self.step, "seconds": time.time() - start,
                   "examples": len(self.examples), "dropped_too_long": self.dropped,
                   "world_size": self.world_size, "final": history[-1] if history else {}}
        return summary

    def _peak_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _full_state(self, module: nn.Module) -> dict:
        if not self.use_fsdp:
            return {k: v.detach().cpu() for k, v in module.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))

    def _full_optimizer_state(self, module, optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=self.use_fsdp, cpu_offload=self.use_fsdp)
        return get_optimizer_state_dict(module, optimizer, options=options)

    def _trained_modules(self):
        return [self.policy] + ([self.value] if self.oreo else [])

    def _write_models(self, out_dir: Path, policy_state: dict, value_state: dict | None):
        from oreo_fast.models import save_checkpoint

        cfg = self.config
        policy = load_policy(cfg.policy, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
        policy.load_state_dict({k.removeprefix("model."): v for k, v in policy_state.items()})
        save_checkpoint(policy, self.tokenizer, out_dir / "policy")
        if value_state is not None:
            value = ValueModel.from_pretrained(cfg.value or cfg.policy, dtype=torch.float32,
                                               trust_remote_code=cfg.trust_remote_code)
            value.load_state_dict({k.removeprefix("value_model."): v
                                   for k, v in value_state.items()})
            value.save_pretrained(out_dir / "value", tokenizer=self.tokenizer)

    def _check_finite(self, what: str) -> None:
        """Refuse to write NaN/Inf: parameters and optimizer states, every rank's shards (one
        all-reduce and one host sync per save)."""
        tensors = [p for m in self._trained_modules() for p in m.parameters()]
        tensors += [v for o in self.optimizers for state in o.state.values()
                    for v in state.values() if isinstance(v, torch.Tensor)]
        ok = faults.local_all_finite(tensors).float().to(self.device)
        if self.distributed:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not ok.item():
            raise NonFiniteError(f"step {self.step}: the parameters or optimizer states hold "
                                 f"NaN/Inf values; {what} not written")

    def save(self, out_dir: Path):
        """Policy and value as Hugging Face folders (safetensors), written atomically."""
        self._check_finite(f"the models in {out_dir}")
        policy_state = self._full_state(self.policy)
        value_state = self._full_state(self.value) if self.oreo else None
        if self.rank == 0:
            self._write_models(out_dir, policy_state, value_state)
        if self.use_fsdp:
            dist.barrier()

    def save_checkpoint(self) -> None:
        """output_dir/checkpoints/step-N: models, optimizer and scheduler states, the step and
        the metrics so far; atomic, the newest ``keep_checkpoints`` kept."""
        self._check_finite(f"checkpoint step-{self.step}")
        states = [self._full_state(m) for m in self._trained_modules()]
        optimizer_states = [self._full_optimizer_state(m, o)
                            for m, o in zip(self._trained_modules(), self.optimizers)]
        if self.rank == 0:
            root = self.output_dir / "checkpoints"
            tensors, optimizer_meta = checkpoint.rng_tensors(), []
            for i, state in enumerate(optimizer_states):
                t, meta = checkpoint.flatten_optimizer_state(state)
                tensors.update({f"optimizer{i}::{k}": v for k, v in t.items()})
                optimizer_meta.append(meta)
            schedulers = [{k: v for k, v in s.state_dict().items() if k != "lr_lambdas"}
                          for s in self.schedulers]
            meta = {"step": self.step, "optimizers": optimizer_meta, "schedulers": schedulers,
                    "history": self.history, "world_size": self.world_size,
                    "skipped_steps": self.skipped_steps, "bad_in_row": self.bad_in_row,
                    "python_random": checkpoint.python_rng_state()}
            with atomic_dir(root / f"step-{self.step}") as tmp:
                self._write_models(tmp, states[0], states[1] if self.oreo else None)
                checkpoint.write_state(tmp / checkpoint.STATE_DIR, meta, tensors)
            checkpoint.prune_checkpoints(root, self.config.keep_checkpoints)
        if self.use_fsdp:
            dist.barrier()

    def _load_trainer_state(self, folder: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        meta, tensors = checkpoint.read_state(folder)
        for i, (module, optimizer) in enumerate(zip(self._trained_modules(), self.optimizers)):
            prefix = f"optimizer{i}::"
            mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            state = checkpoint.unflatten_optimizer_state(mine, meta["optimizers"][i])
            set_optimizer_state_dict(module, optimizer, state,
                                     options=StateDictOptions(full_state_dict=self.use_fsdp))
        for scheduler, state in zip(self.schedulers, meta["schedulers"]):
            scheduler.load_state_dict({**scheduler.state_dict(), **state})
        checkpoint.restore_rng(tensors, meta)
        self.step, self.history = meta["step"], meta["history"]
        self.skipped_steps, self.bad_in_row = meta["skipped_steps"], meta["bad_in_row"]


class MetricSinks:
    """TensorBoard and W&B, when asked for; a missing package is reported before training."""

    def __init__(self, config: TrainConfig, output_dir: Path, enabled: bool):
        self.writers = []
        if not enabled:
            return
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError("tensorboard=true needs the tensorboard package") from None
            self.writers.append(("tb", SummaryWriter(str(output_dir / "tensorboard"))))
        if config.wandb:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("wandb=true needs the wandb package") from None
            import dataclasses

            run = wandb.init(project="oreo_fast", dir=str(output_dir),
                             config=dataclasses.asdict(config))
            self.writers.append(("wandb", run))

    def log(self, values: dict, step: int) -> None:
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        for kind, writer in self.writers:
            if kind == "tb":
                for k, v in scalars.items():
                    writer.add_scalar(k, v, step)
            else:
                writer.log(scalars, step=step)

    def close(self) -> None:
        for kind, writer in self.writers:
            writer.close() if kind == "tb" else writer.finish()


def plot_curves(history: list[dict], path: Path) -> None:
    """Training curves as a PNG (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    keys = [k for k in ("loss", "value_loss", "policy_loss", "kl", "first_value") if history
            and k in history[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    steps = [row["step"] for row in history]
    for ax, key in zip(axes[0], keys):
        ax.plot(steps, [row[key] for row in history])
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oreo-fast train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON or TOML file of TrainConfig keys")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = parser.parse_args(argv)
    exit_with_launcher()
    try:
        config = load_config(args.config, args.overrides)
        trainer = Trainer(config)
        summary = trainer.fit()
    except (DataError, ConfigError, NonFiniteError) as e:
        # every rank meets these alike; one line each, no stack trace, exit status 2
        rank = os.environ.get("RANK")
        print(f"oreo-fast train: error{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr)
        sys.exit(2)
    if trainer.rank == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "final"}))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
