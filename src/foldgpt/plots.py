"""Figures (PNG): similarity, gates, training curves, and bench's methods against unique parameters.

matplotlib is imported on first use, so `import foldgpt` stays light."""

from __future__ import annotations

import math
from pathlib import Path

Points = list[tuple[float, float]]

# distinct (colour, marker) pairs for the methods; red is kept for the highlighted one
_COLOURS = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive",
            "tab:cyan", "navy", "goldenrod"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "*"]
OUTLIER = 3.0  # a value above this many times a panel's median is drawn at the panel's top edge, with its value
LOG_SPAN = 30.0  # a panel whose shown values span more than this ratio gets a log axis (uncured perplexities)


def _plt():
    """matplotlib.pyplot with the file backend, imported on first use (keeps `import foldgpt` light)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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


def y_range(values: list[float]) -> tuple[bool, tuple[float, float] | None]:
    """(log axis, (bottom, top) of a linear axis or None for matplotlib's) for a panel's values: values above
    OUTLIER times the median are clipped, unless the rest still spans more than LOG_SPAN, which a log axis shows
    whole."""
    vals = sorted(v for v in values if math.isfinite(v))
    if not vals:
        return False, None
    mid = len(vals) // 2
    median = vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2
    kept = [v for v in vals if v <= OUTLIER * median] or vals
    if vals[0] > 0 and kept[-1] / vals[0] > LOG_SPAN:
        return True, None
    if kept[-1] == vals[-1]:
        return False, None
    pad = 0.08 * (kept[-1] - kept[0]) or 0.08 * abs(kept[-1]) or 1.0
    return False, (kept[0] - pad, kept[-1] + pad)


def _value(y: float) -> str:
    return f"{y:,.0f}" if y < 1e6 else f"{y:.1e}"


def plot_methods(panels: dict[str, dict[str, Points]], path: Path, xlabel: str, ylabel: str, title: str = "",
                 highlight: str | None = None, reference: tuple[str, float] | None = None) -> None:
    """One panel per title (e.g. with and without the cure), one line per method in a distinct colour and marker,
    `highlight` drawn bold in red, `reference` (a label and a value, e.g. the dense model's) as a dotted line.
    Each panel's legend is outside its data; outliers are drawn on the top edge with their value (y_range)."""
    plt = _plt()
    panels = {t: s for t, s in panels.items() if any(s.values())}
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.8 * len(panels)), sharex=True, squeeze=False)
    styles: dict[str, tuple[str, str]] = {}  # one style per method across panels
    xs = [x for series in panels.values() for pts in series.values() for x, _ in pts]
    near = 0.02 * ((max(xs) - min(xs)) or 1.0)  # off-scale points closer than this share a stack of labels
    for ax, (panel, series) in zip(axes[:, 0], panels.items()):
        ys = [y for pts in series.values() for _, y in pts] + ([reference[1]] if reference else [])
        logy, limits = y_range(ys)
        clipped = []
        for name, pts in series.items():
            pts = sorted(p for p in pts if math.isfinite(p[1]))
            if name == highlight:
                colour, marker, kw = "tab:red", "o", {"lw": 2.6, "ms": 9, "zorder": 5}
            else:
                colour, marker = styles.setdefault(
                    name, (_COLOURS[len(styles) % len(_COLOURS)], _MARKERS[len(styles) % len(_MARKERS)]))
                variant = "[" in name or "-" in name  # an ablation or an override (foldgpt-no-tail, sleb[...])
                kw = {"lw": 1.2, "ms": 6, "alpha": 0.85, "ls": "--" if variant else "-"}
            ax.plot([x for x, _ in pts], [y for _, y in pts], color=colour, marker=marker, label=name, **kw)
            clipped += [(x, y, name, colour) for x, y in pts if limits is not None and y > limits[1]]
        if reference:
            ax.axhline(reference[1], color="black", ls=":", lw=1.2, label=f"{reference[0]}: {reference[1]:.4g}")
        if logy:
            ax.set_yscale("log")
        elif limits is not None:
            ax.set_ylim(*limits)
            placed: list[float] = []
            for x, y, name, colour in sorted(clipped):
                k = sum(abs(x - other) < near for other in placed)
                placed.append(x)
                ax.plot([x], [limits[1]], marker="^", color=colour, ms=9, clip_on=False, zorder=6)
                ax.annotate(f"{name} {_value(y)}", (x, limits[1]), xytext=(7, -4 - 10 * k), textcoords="offset points",
                            fontsize=7, color=colour, va="top")
        ax.set_title(panel, fontsize=10, loc="left")
        if clipped:
            ax.set_title(f"▲ {len(clipped)} off the scale: drawn at the top edge, value beside", fontsize=8,
                         loc="right", color="dimgray")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)
    axes[-1, 0].set_xlabel(xlabel)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
