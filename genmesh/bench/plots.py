"""PNG plots of a `genmesh bench serve` result: latency vs load, goodput vs load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt

_LATENCIES = (("ttft_ms", "time to first token"), ("tpot_ms", "time per output token"),
              ("itl_ms", "inter-token latency"), ("e2e_ms", "end-to-end latency"))
_SLO_OF = {"ttft_ms": "ttft_ms", "tpot_ms": "tpot_ms"}


def _axis_label(result: dict[str, Any]) -> str:
    if result["load"]["kind"] == "concurrency":
        return "concurrency (conversations in flight)"
    return "request rate (conversations/s, Poisson)"


def _series(levels: dict[str, Any], labels: list[str], metric: str, stat: str
            ) -> list[float]:
    """One statistic at each load level (NaN where absent: no point is drawn)."""
    out = []
    for label in labels:
        value = levels.get(label, {}).get(metric, {}).get(stat)
        out.append(float("nan") if value is None else float(value))
    return out


def latency_plot(result: dict[str, Any], path: Path) -> Path:
    labels = result["load"]["levels"]
    x = list(range(len(labels)))
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    for ax, (metric, title) in zip(axes.flat, _LATENCIES, strict=True):
        for i, (name, target) in enumerate(result["targets"].items()):
            color = f"C{i}"
            ax.plot(x, _series(target["levels"], labels, metric, "p50"), "o-", color=color,
                    label=f"{name} p50")
            ax.plot(x, _series(target["levels"], labels, metric, "p99"), "s--", color=color,
                    label=f"{name} p99")
        if metric in _SLO_OF:
            ax.axhline(result["slo"][_SLO_OF[metric]], color="grey", linestyle=":",
                       label="SLO")
        ax.set_title(title)
        ax.set_xticks(x, labels)
        ax.set_xlabel(_axis_label(result))
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"bench serve: latency vs load ({result['workload']['name']} workload, "
                 f"{result['max_tokens']} output tokens, {result['model']})")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def goodput_plot(result: dict[str, Any], path: Path) -> Path:
    labels = result["load"]["levels"]
    x = list(range(len(labels)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    for i, (name, target) in enumerate(result["targets"].items()):
        levels, color = target["levels"], f"C{i}"
        left.plot(x, [levels[k]["goodput"] for k in labels], "o-", color=color,
                  label=f"{name} goodput")
        left.plot(x, [levels[k]["request_throughput"] for k in labels], "x:", color=color,
                  label=f"{name} all completed")
        right.plot(x, [levels[k]["output_throughput"] for k in labels], "o-", color=color,
                   label=name)
    slo = result["slo"]
    left.set_title(f"goodput (TTFT ≤ {slo['ttft_ms']:g} ms and TPOT ≤ {slo['tpot_ms']:g} ms)")
    left.set_ylabel("requests/s")
    right.set_title("output throughput")
    right.set_ylabel("tokens/s")
    for ax in (left, right):
        ax.set_xticks(x, labels)
        ax.set_xlabel(_axis_label(result))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ratio = result.get("goodput_ratio", {}).get("best_level")
    if ratio is not None:
        fig.suptitle(f"mesh / seed-fastapi goodput at each one's best level: {ratio:g}x")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(result: dict[str, Any], plot_dir: Path) -> list[Path]:
    """latency.png and goodput.png in ``plot_dir`` (made if missing)."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    return [latency_plot(result, plot_dir / "latency.png"),
            goodput_plot(result, plot_dir / "goodput.png")]
