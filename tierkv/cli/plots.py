"""Pictures of what the commands measured (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from typing import Any


def plot_demo(report: dict[str, Any], path: str) -> None:
    """Two panels: time to first token per turn without and with tierkv (medians, min-max bars),
    and each turn's prompt split into tokens reused from the store and tokens computed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns = report["turns"]
    x = list(range(1, len(turns) + 1))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=120)
    width = 0.38
    for offset, key, label, color in ((-width / 2, "plain", "without tierkv", "#b0b0b0"),
                                      (width / 2, "tierkv", "with tierkv", "#1f77b4")):
        med = [t[f"ttft_{key}_s"] * 1e3 for t in turns]
        lo = [m - min(t[f"ttft_{key}_samples_s"]) * 1e3 for m, t in zip(med, turns)]
        hi = [max(t[f"ttft_{key}_samples_s"]) * 1e3 - m for m, t in zip(med, turns)]
        left.bar([i + offset for i in x], med, width, yerr=[lo, hi], capsize=3, label=label, color=color)
        for i, m, h in zip(x, med, hi):  # the median's figure above the whisker, not on it
            left.annotate(f"{m:.0f}", (i + offset, m + h), xytext=(0, 3), textcoords="offset points", ha="center",
                          fontsize=8)
    for i, t in zip(x, turns):
        left.annotate(f"{t['speedup']:.1f}x", (i, 0), xytext=(0, -28), textcoords="offset points", ha="center",
                      fontsize=9, color="#1f77b4", annotation_clip=False)
    left.set_xticks(x, [f"turn {i}" for i in x])
    left.set_ylabel("time to first token (ms)")
    left.set_title(f"Time to first token per turn (median of {report['repeat']}, min-max bars)", fontsize=10)
    left.legend(frameon=False, fontsize=9)
    left.margins(y=0.15)

    reused = [t["reused_tokens"] for t in turns]
    computed = [t["computed_tokens"] for t in turns]
    right.bar(x, reused, 0.6, label="reused from tierkv", color="#1f77b4")
    right.bar(x, computed, 0.6, bottom=reused, label="computed (prefill)", color="#ff7f0e")
    for i, r, c in zip(x, reused, computed):
        right.annotate(f"{r} / {r + c}", (i, r + c), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8)
    right.set_xticks(x, [f"turn {i}" for i in x])
    right.set_ylabel("prompt tokens")
    saved = report["saved_tokens"] / report["prefill_tokens"] if report["prefill_tokens"] else 0.0
    right.set_title(f"Prefill tokens per turn: {saved:.0%} reused from the store", fontsize=10)
    right.legend(frameon=False, fontsize=9, loc="upper left")
    right.margins(y=0.15)

    model = report["model"].split(" from ")[0]
    fig.suptitle(f"tierkv demo: {model} on {report['device']} ({report['threads']} threads)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
