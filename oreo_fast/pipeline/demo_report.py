"""What the demo prints and draws from its ``results.json``: the table and the bar chart."""
from __future__ import annotations

from pathlib import Path

from oreo_fast.io import atomic_open


def format_table(results: dict) -> str:
    """The demo's printed table: accuracy ± SE per method, then the paired differences."""
    rows = [("method", "test greedy acc (± SE)", "val greedy acc")]
    errors = results.get("standard_errors", {})
    for name in ("sft", "rft", "oreo", "oreo_beam"):
        if name in results:
            se = f" ± {errors[name]:.3f}" if name in errors else ""
            rows.append((name.upper().replace("_", " + "), f"{results[name]:.3f}{se}",
                         f"{results['validation'].get(name, float('nan')):.3f}"))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, width)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in width))
    for pair, d in results.get("paired_differences", {}).items():
        verdict = "excludes 0" if d["excludes_zero"] else "includes 0"
        lines.append(f"{pair}: {d['difference']:+.3f}, 95% interval [{d['low']:+.3f}, "
                     f"{d['high']:+.3f}] ({verdict})")
    seeds = results.get("seeds", 1)
    return "\n".join(lines) + (f"\n({results['n_problems']} held-out test problems, "
                               + ("one seed)" if seeds == 1 else
                                  f"{seeds} seeds of sampling, RFT and OREO; one SFT)"))


def bar_chart(accuracy: dict, path: Path) -> None:
    """``results.png``: the test accuracy of each method (nothing without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(4.5, 3))
    names = list(accuracy)
    bars = ax.bar([n.upper() for n in names], [accuracy[n] for n in names],
                  color=["#999999", "#6f9fd8", "#d8842f", "#b0552a"][:len(names)])
    ax.bar_label(bars, fmt="%.3f")
    ax.set_ylabel("accuracy (held-out test)")
    ax.set_title("Embedded default: SFT vs RFT vs OREO")
    ax.set_ylim(0, 1)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
