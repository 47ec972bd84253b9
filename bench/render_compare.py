"""Render the rows of bench/compare_default.sh as a markdown table (and a plot: perplexity against compression
time), with the mean over cure seeds.

    python bench/render_compare.py bench/results/compare_smollm2-135m_075
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

LABELS = {
    "foldgpt": "**foldgpt** (default: one search, fitted children, cure)",
    "foldgpt_noalpha": "foldgpt, children never add alpha * parent (`--no-alpha`)",
    "foldgpt_nocure": "foldgpt, no cure",
    "foldgpt_childlr1": "foldgpt, child factors at the full cure learning rate (`--child-lr-scale 1`)",
    "foldgpt_nosub": "foldgpt, search without sub-block deletions (`--actions layer,child`)",
    "foldgpt_childlr0": "foldgpt, child factors frozen in the cure (`--child-lr-scale 0`)",
    "foldgpt_compensate": "foldgpt + ReplaceMe compensation of its deletions (`--compensate replaceme`)",
    "foldgpt_greedy": "foldgpt, the earlier two greedy searches (`--ranking greedy`)",
    "foldgpt_r0125": "foldgpt, children at 12.5% of a block only (`--child-fractions 0.125`)",
    "foldgpt_refine": "foldgpt + exchange rounds after the search (`--refine 8`)",
    "foldgpt_sg1": "foldgpt, general windows in the search's score (`--search-general 1`)",
    "foldgpt_r025": "foldgpt, children at 25% of a block only (`--child-fractions 0.25`)",
    "foldgpt_plan_nocure": "foldgpt's plan (fitted children), no cure",
    "foldgpt_plan_childlr0": "foldgpt's plan, child factors frozen in the cure (`--child-lr-scale 0`)",
    "sleb_nocure": "SLEB, no cure",
    "foldgpt_gen25": "foldgpt, a quarter of general calibration text (`--general-share 0.25`)",
    "shortgpt_gen25": "ShortGPT + cure, a quarter of general calibration text (`--general-share 0.25`)",
    "sleb_gen25": "SLEB + cure, a quarter of general calibration text (`--general-share 0.25`)",
    "blockpruner_gen25": "BlockPruner + cure, a quarter of general calibration text (`--general-share 0.25`)",
    "shortgpt": "ShortGPT + cure",
    "sleb": "SLEB + cure",
    "sleb_search": "SLEB (its own search on this text) + cure",
    "blockpruner": "BlockPruner + cure",
    "replaceme": "ReplaceMe + cure",
    "replaceme_nocure": "ReplaceMe, no cure",
    "sleb_replaceme": "SLEB + ReplaceMe compensation + cure",
}


def main() -> None:
    folder = Path(sys.argv[1])
    groups: dict[str, list[dict]] = {}
    for f in sorted(folder.glob("*.json")):
        name = f.stem.rsplit("_s", 1)[0] if f.stem.rsplit("_s", 1)[-1].isdigit() else f.stem
        groups.setdefault(name, []).append(json.loads(f.read_text()))
    first = next(iter(groups.values()))[0]
    other = "calib_text" in first and not first["calib_text"][0].startswith("austen_")  # TEXT=code and the like
    held, ood = ("held-out text", "Pride and Prejudice") if other else ("P&P", "GPL-3 text")
    lines = [f"| method | unique params | PPL ({held}), per cure seed | mean | PPL ({ood}) | wall s (compress) "
             "| peak RSS GiB |", "|---|---|---|---|---|---|---|"]
    means = {}
    for name, rows in sorted(groups.items(), key=lambda kv: statistics.mean(_ppl(r) for r in kv[1])):
        ppl = [_ppl(r) for r in rows]
        means[name] = statistics.mean(ppl)
        lines.append(f"| {LABELS.get(name, name)} | {rows[0]['params_ratio']:.1%} | "
                     f"{' / '.join(f'{p:.2f}' for p in ppl)} | {means[name]:.2f} | "
                     f"{' / '.join(_ood(r) for r in rows)} | "
                     f"{' / '.join(str(round(r['wall_seconds'])) for r in rows)} | "
                     f"{max(r['peak_rss_bytes'] for r in rows) / 2**30:.2f} |")
    peers = {k: v for k, v in means.items() if not k.startswith("foldgpt") and "nocure" not in k and "gen25" not in k}
    if "foldgpt" in means and peers:
        best = min(peers, key=peers.get)
        lines.append("")
        lines.append(f"Default vs best peer + cure ({LABELS.get(best, best)}): {means['foldgpt']:.2f} vs "
                     f"{peers[best]:.2f}, {1 - means['foldgpt'] / peers[best]:+.1%} lower perplexity.")
    if other:
        lines += ["", f"Calibration text: {', '.join(first['calib_text'])}; PPL (held-out text): the first 16,384 "
                  f"tokens of {first['eval_text']} (bench/other_text.py); PPL (Pride and Prejudice): its first 16,384 "
                  "tokens, text of another kind than the calibration text.", "", "Peers' searches ran on this text "
                  "(no re-applied plans)."]
    else:
        lines += ["", "PPL (P&P): the first 16,384 tokens of Pride and Prejudice (held out from the calibration "
                  "novels). PPL (GPL-3 text): the GNU GPL v3 licence, text of another kind than the calibration "
                  "novels, where the row measured it.", "", "SLEB's and BlockPruner's rows re-apply the plans their "
                  "own searches found for this model and data (bench/plans/README.md): their wall time is the cure's "
                  "and the rest of the pipeline, without their search."]
    lines += ["Layer-granular peers cannot land on the target exactly and keep fewer parameters."]
    text = "\n".join(lines) + "\n"
    (folder / "table.md").write_text(text)
    print(text)
    plot(groups, folder / "ppl_vs_time.png", held if other else "Pride and Prejudice")


def plot(groups: dict[str, list[dict]], path: Path, held: str = "Pride and Prejudice") -> None:
    """Mean perplexity against mean compression wall time, one marker per method, the default highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    markers = "osD^v<>PX*h"
    for i, (name, rows) in enumerate(sorted(groups.items())):
        if "nocure" in name:
            continue  # uncured rows sit far above; the table has them
        x = statistics.mean(r["wall_seconds"] for r in rows) / 60
        y = statistics.mean(_ppl(r) for r in rows)
        main = name == "foldgpt"
        ax.scatter(x, y, s=140 if main else 60, marker="*" if main else markers[i % len(markers)],
                   color="crimson" if main else f"C{i % 10}", zorder=3, label=LABELS.get(name, name).replace("*", ""))
    ax.set_xlabel("compression wall time, minutes")
    ax.set_ylabel(f"perplexity, {held} (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ood(row: dict) -> str:
    return f"{_ppl(row, 'eval_ood'):.2f}" if row.get("eval_ood") else "-"


def _ppl(row: dict, key: str = "eval") -> float:
    ev = row[key]
    if isinstance(ev, list):
        ev = ev[0]
    for k in ("perplexity", "ppl"):
        if k in ev:
            return float(ev[k])
    for v in ev.values():
        if isinstance(v, dict) and "perplexity" in v:
            return float(v["perplexity"])
        if isinstance(v, list) and v and isinstance(v[0], dict) and "perplexity" in v[0]:
            return float(v[0]["perplexity"])
    raise KeyError("perplexity")


if __name__ == "__main__":
    main()
