"""What people read: text tables for the terminal, a run folder's report.md and model card (README.md) and its
figures (drawn by plots.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from .fileio import write_text_atomic

if TYPE_CHECKING:
    from .plan import Plan


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


def ppl(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.2f}" if x < 1000 else f"{x:,.0f}"


def summary_table(s: dict) -> str:
    """A compress run's summary.json as the before/after table `foldgpt compress` prints, then the stage times."""
    rows = [
        ["unique params", fmt_int(s["base_params"]), fmt_int(s["unique_params"]), f"{s['params_ratio']:.1%}"],
        ["FLOPs / token", fmt_int(s["flops_per_token_base"]), fmt_int(s["flops_per_token"]), f"{s['flops_ratio']:.1%}"],
        ["depth (positions)", s["depth_base"], s["depth"], ""],
        ["calibration loss (nats)", f"{s['calib_loss_dense']:.4f}", f"{s['calib_loss']:.4f}",
         f"before cure {s['calib_loss_before_cure']:.4f}"],
    ]
    if s.get("size"):  # --quantize / --target-size: bytes next to the budget (size.size_summary)
        z, q = s["size"], s.get("quantization") or {}
        budget = f"budget {z['budget_bytes'] / 1e6:.1f} MB" if z.get("budget_bytes") else ""
        dense = q.get("dense_bytes")
        rows += [["weights on disk (MB)", f"{dense / 1e6:.1f}" if dense else "-", f"{z['weights_bytes'] / 1e6:.1f}",
                  f"{budget}{', ' if budget and q else ''}{q.get('level', '')}"],
                 ["resident weights (MB)", "", f"{z['resident_bytes'] / 1e6:.1f}", ""]]
    out = text_table(["", "before", "after", "ratio / note"], rows)
    out += "\n\n" + text_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in s["seconds"].items()])
    return out


def eval_table(rows: list[dict]) -> str:
    """`evaluate`'s rows as the table `foldgpt eval` prints."""
    task_names = list(rows[0].get("tasks", {}))
    headers = ["model", "perplexity", "bits/byte", "tokens", "unique params"]
    headers += [f"{t} acc/acc_norm" for t in task_names]
    if "cloze" in rows[0]:
        headers.append("cloze acc")
    body = []
    for r in rows:
        line = [r["model"], ppl(r.get("perplexity")), f"{r['bits_per_byte']:.4f}" if "bits_per_byte" in r else "-",
                r.get("tokens", "-"), fmt_int(r["unique_params"])]
        line += [f"{r['tasks'][t]['acc']:.3f}/{r['tasks'][t]['acc_norm']:.3f}" for t in task_names]
        if "cloze" in r:
            line.append(f"{r['cloze']['acc']:.3f}")
        body.append(line)
    return text_table(headers, body)


def info_text(d: dict) -> str:
    """`info`'s dict as the table `foldgpt info` prints."""
    rows = [[k, d[k] if not isinstance(d[k], int) or isinstance(d[k], bool) else fmt_int(d[k])]
            for k in d if d[k] is not None]
    return text_table(["field", "value"], rows)


def write_analysis_figures(results: dict[str, dict], folder: Path) -> None:
    """`analyze`'s figures: one similarity heatmap per model and similarity.png (one line per model)."""
    from .plots import plot_heatmap, plot_similarity_lines

    for name, res in results.items():
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name or name)
        plot_heatmap(res["similarity_matrix"], folder / f"heatmap_{stem}.png", f"{name}: mean cosine")
    plot_similarity_lines({n: r["cosine"] for n, r in results.items()}, folder / "similarity.png")


def write_figures(folder: Path, plan: Plan, analysis: dict, gate_history: list[dict], cure_info: dict,
                  source: str) -> list[str]:
    """A compressed model's figures (similarity, gates and gate training, cure); returns their file names."""
    from .plots import plot_curves, plot_gates, plot_heatmap, plot_similarity_lines

    plot_heatmap(analysis["similarity_matrix"], folder / "similarity_heatmap.png", f"{source}: mean cosine")
    plot_similarity_lines({source: analysis["cosine"]}, folder / "similarity.png")
    figs = ["similarity.png", "similarity_heatmap.png"]
    if plan.gates:
        plot_gates(list(plan.gates), list(plan.gates.values()), plan.removed, folder / "gates.png")
        figs.append("gates.png")
        plot_curves({"KL to dense": [h["kl"] for h in gate_history]}, folder / "gate_training.png", "KL",
                    "gate training")
        figs.append("gate_training.png")
    if cure_info.get("history"):
        h = cure_info["history"]
        plot_curves({"KL": [x["kl"] for x in h], "tail MSE": [x["tail"] for x in h]}, folder / "cure.png",
                    "loss", "cure")
        figs.append("cure.png")
    return figs


def write_bench_figures(rows: list[dict], folder: Path) -> None:
    """A bench's perplexity_vs_params.png and (with tasks) accuracy_vs_params.png: each method's rows against
    unique parameters, the cured and the uncured ones in separate panels, foldgpt highlighted, the dense model as
    a reference line."""
    from .plots import plot_methods

    name = next(iter(rows[0]["perplexity"]))
    dense = next((r for r in rows if r["method"] == "dense"), None)
    ppl_panels: dict[bool, dict[str, list]] = {True: {}, False: {}}
    acc_panels: dict[bool, dict[str, list]] = {True: {}, False: {}}
    for r in rows:
        if r is dense:
            continue
        x = r["unique_params"] / 1e6
        ppl_panels[r["cure"]].setdefault(r["method"], []).append((x, r["perplexity"][name]))
        if r["tasks"]:
            acc_panels[r["cure"]].setdefault(r["method"], []).append((x, _mean_accuracy(r)))
    titles = {True: "with the cure", False: "without a cure"}
    xlabel = "unique parameters (M)"
    ref = ("dense", dense["perplexity"][name]) if dense else None
    plot_methods({titles[c]: ppl_panels[c] for c in (True, False)}, folder / "perplexity_vs_params.png", xlabel,
                 "perplexity", f"Perplexity on {name} (lower is better)", highlight="foldgpt", reference=ref)
    if any(acc_panels[c] for c in (True, False)):
        ref = ("dense", _mean_accuracy(dense)) if dense and dense["tasks"] else None
        plot_methods({titles[c]: acc_panels[c] for c in (True, False)}, folder / "accuracy_vs_params.png", xlabel,
                     "mean accuracy", f"Mean accuracy over {len(rows[0]['tasks'])} tasks (higher is better)",
                     highlight="foldgpt", reference=ref)


def _mean_accuracy(row: dict) -> float:
    return sum(row["tasks"].values()) / len(row["tasks"])


def write_report(folder: Path, summary: dict, plan: Plan, figs: list[str], source: str) -> None:
    """A compressed model's report.md and model card README.md (after its weights: the card gives their size)."""
    write_text_atomic(folder / "report.md", report_md(summary, plan, figs, source))
    write_text_atomic(folder / "README.md", model_card(summary, plan, source, folder))


def report_md(s: dict, plan: Plan, figs: list[str], source: str) -> str:
    lm = plan.layer_map()
    rows = [[m["position"], m["source"], m["weights_from"], "yes" if m["shared"] else "", m["kind"],
             ",".join(m["removed_sublayers"])] for m in lm]
    parts = [
        f"# foldgpt report: {source}",
        f"Method **{s['method']}**: {fmt_int(s['base_params'])} -> {fmt_int(s['unique_params'])} unique parameters "
        f"({s['params_ratio']:.1%}), FLOPs per token {s['flops_ratio']:.1%} of dense, depth {s['depth_base']} -> "
        f"{s['depth']}.",
        f"Removed units: {', '.join(plan.removed) or 'none'}. Folded groups (parent first): "
        f"{', '.join(str(g) for g in plan.groups) or 'none'}.",
        "## Summary",
        "```\n" + summary_table(s) + "\n```",
        "## Layer map",
        markdown_table(["position", "original layer", "weights from", "shared", "kind", "removed sub-blocks"], rows),
        "## Figures",
        *[f"![{f}]({f})" for f in figs],
    ]
    return "\n\n".join(parts) + "\n"


def model_card(s: dict, plan: Plan, source: str, folder: Path) -> str:
    weights = folder / "model.safetensors"
    size = weights.stat().st_size if weights.exists() else 0
    base_bytes = s["base_params"] * 4
    return "\n".join([
        "---",
        "library_name: transformers",
        "tags: [foldgpt, compressed, depth-pruning, parameter-sharing]",
        "---",
        f"# {Path(str(source)).name} compressed with foldgpt ({s['method']})",
        "",
        f"- **Base model:** `{source}` ({s['depth_base']} layers, {fmt_int(s['base_params'])} parameters)",
        f"- **Method:** {s['method']}: removed {', '.join(plan.removed) or 'nothing'}; folded groups (parent first) "
        f"{', '.join(str(g) for g in plan.groups) or 'none'}; per-child low-rank rank {plan.adapter_rank}",
        f"- **Unique parameters:** {fmt_int(s['base_params'])} -> {fmt_int(s['unique_params'])} "
        f"({s['params_ratio']:.1%}); FLOPs per token {s['flops_ratio']:.1%} of the base",
        f"- **Bytes (fp32 weights):** {base_bytes / 2**20:.1f} MiB -> {size / 2**20:.1f} MiB on disk",
        f"- **Calibration loss (nats/token):** dense {s['calib_loss_dense']:.4f}, compressed {s['calib_loss']:.4f} "
        f"(before the cure {s['calib_loss_before_cure']:.4f}); cure: {s['cure_steps']} steps, "
        f"{fmt_int(s['trainable_params'])} trained parameters",
        "",
        "## Load",
        "```python",
        "import foldgpt  # registers the foldgpt model type with the Auto classes",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained(PATH)",
        "# without foldgpt installed: AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)",
        "```",
        "A plain checkpoint of the base architecture (for vLLM, TGI, llama.cpp converters): "
        "`foldgpt export PATH --dense OUT`.",
        "",
    ])
