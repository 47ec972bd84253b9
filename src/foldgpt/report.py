"""Tables and plots (PNG) people would rather look at than read, and the run's report.md."""

from __future__ import annotations

import math
from pathlib import Path


def _plt():
    """matplotlib.pyplot with the file backend, imported on first use (keeps `import foldgpt` light)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fmt_int(n: float | None) -> str:
    return "-" if n is None else f"{int(n):,}"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def text_table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_heatmap(sim: list[list[float]], path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(sim, cmap="viridis", vmin=min(0.0, min(min(r) for r in sim)), vmax=1.0)
    ax.set_xlabel("hidden state j (0 = embeddings)")
    ax.set_ylabel("hidden state i")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="mean cosine")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_similarity_lines(series: dict[str, list[float]], path: Path) -> None:
    """One line per model: cos(h_l, h_{l+1}) against relative depth."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, cos in series.items():
        n = len(cos)
        ax.plot([(i + 0.5) / n for i in range(n)], cos, marker="o", ms=3, label=name)
    ax.set_xlabel("relative depth")
    ax.set_ylabel("cos(block input, block output)")
    ax.set_ylim(top=1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gates(names: list[str], gates: list[float], removed: list[str], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.25), 3.5))
    colors = ["tab:red" if n in removed else "tab:blue" for n in names]
    ax.bar(range(len(names)), gates, color=colors)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel("learned gate")
    ax.set_ylim(0, 1.05)
    ax.set_title("gates (red: removed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(curves: dict[str, list[float]], path: Path, ylabel: str, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, ys in curves.items():
        if ys:
            ax.plot(range(len(ys)), ys, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if all(y > 0 for ys in curves.values() for y in ys) and any(curves.values()):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if any(curves.values()):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_xy(series: dict[str, list[tuple[float, float]]], path: Path, xlabel: str, ylabel: str,
            logy: bool = False) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, pts in series.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ppl(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.2f}" if x < 1000 else f"{x:,.0f}"
