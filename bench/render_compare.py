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
    "sleb": "SLEB + cure",
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
    lines = ["| method | unique params | PPL (P&P), per cure seed | mean | wall s (compress) | peak RSS GiB |",
             "|---|---|---|---|---|---|"]
    means = {}
    for name, rows in sorted(groups.items(), key=lambda kv: statistics.mean(_ppl(r) for r in kv[1])):
        ppl = [_ppl(r) for r in rows]
        means[name] = statistics.mean(ppl)
        lines.append(f"| {LABELS.get(name, name)} | {rows[0]['params_ratio']:.1%} | "
                     f"{' / '.join(f'{p:.2f}' for p in ppl)} | {means[name]:.2f} | "
                     f"{' / '.join(str(round(r['wall_seconds'])) for r in rows)} | "
                     f"{max(r['peak_rss_bytes'] for r in rows) / 2**30:.2f} |")
    peers = {k: v for k, v in means.items() if not k.startswith("foldgpt") and "nocure" not in k}
    if "foldgpt" in means and peers:
        best = min(peers, key=peers.get)
        lines.append("")
        lines.append(f"Default vs best peer + cure ({LABELS.get(best, best)}): {means['foldgpt']:.2f} vs "
                     f"{peers[best]:.2f}, {1 - means['foldgpt'] / peers[best]:+.1%} lower perplexity.")
    lines += ["", "SLEB's and BlockPruner's rows re-apply the plans their own searches found for this model and data "
              "(bench/plans/README.md): their wall time is the cure's and the rest of the pipeline, without their "
              "search. Layer-granular peers cannot land on the target exactly and keep fewer parameters."]
    text = "\n".join(lines) + "\n"
    (folder / "table.md").write_text(text)
    print(text)


def _ppl(row: dict) -> float:
    ev = row["eval"]
    if isinstance(ev, list):
        ev = ev[0]
    for key in ("perplexity", "ppl"):
        if key in ev:
            return float(ev[key])
    for v in ev.values():
        if isinstance(v, dict) and "perplexity" in v:
            return float(v["perplexity"])
        if isinstance(v, list) and v and isinstance(v[0], dict) and "perplexity" in v[0]:
            return float(v[0]["perplexity"])
    raise KeyError("perplexity")


if __name__ == "__main__":
    main()
