"""Where training metrics go: ``metrics.jsonl`` (written atomically at the end), TensorBoard
and W&B when asked for, and ``curves.png``."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from oreo_fast.io import atomic_open


class MetricSinks:
    """TensorBoard and W&B, when asked for; a missing package is reported before training."""

    def __init__(self, config, output_dir: Path, enabled: bool):
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


def write_history(history: list[dict], path: Path) -> None:
    """Every step's metrics as JSONL, atomically."""
    with atomic_open(path) as f:
        for row in history:
            f.write(json.dumps(row) + "\n")


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
