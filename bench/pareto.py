"""Bytes on disk against held-out perplexity on SmolLM2-135M: the dense model, dense + int8 / int4, the best peer +
cure at 75% and 60% (SLEB, ShortGPT; bench/compare_default.sh's rows) and foldgpt's default at 75% and 60%, each
also + int8 / int4, `foldgpt compress --target-size` at three budgets, and the best peer at 60% (ShortGPT + cure)
given the 60 MB budget by the same rule.

    python bench/pareto.py                       (about 3 h on 2 CPU cores; a point whose JSON exists is skipped)
    python bench/pareto.py --only dense,dense+int4   (some points)
    python bench/pareto.py --render              (the table and the plot from the points done)

Every point is one JSON in OUT/points/ (OUT: bench/results/pareto_smollm2-135m), written when it finishes, so a
stopped run continues where it stopped. The compressed folders are kept in --work (default: ~/.cache/foldgpt/pareto)
so that the +int8 / +int4 points quantize the saved folder (foldgpt.quant.quantize_folder) instead of compressing
again. Calibration: the five Austen calibration novels (SHARED_DATA overrides where the data is), compress's
defaults otherwise; evaluation: `foldgpt eval` on the first 16,384 tokens of Pride and Prejudice (512-token windows),
as bench/compress_time.py. "weights MB" is the size of model.safetensors; the tokenizer and config files (the same
3.5 MB for every point) are not counted. The commands run `python -m foldgpt.cli` on this checkout's sources.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
CALIB = ["emma", "mansfieldpark", "sensesensibility", "northangerabbey", "persuasion"]
PLANS = ROOT / "bench" / "plans"
# name -> how the point is made: ("dense",), ("compress", [compress args]), ("quantize", source point, level)
POINTS: dict[str, tuple] = {"dense": ("dense",)}
for _lvl in ("int8", "int4"):
    POINTS[f"dense+{_lvl}"] = ("quantize", "dense", _lvl)
for _size in ("100MB", "120MB"):  # the whole model fits at int4: no search, no cure (the cheap ones first)
    POINTS[f"target-size {_size}"] = ("compress", ["--target-size", _size, "--cure-seed", "0"])
for _name, _args in {
    "foldgpt-75": ["--target-params", "0.75", "--cure-seed", "0"],
    "foldgpt-60": ["--target-params", "0.6", "--cure-seed", "0"],
    "sleb-75+cure": ["--target-params", "0.75", "--method", "sleb", "--plan", str(PLANS / f"{MODEL}_075_sleb.json"),
                     "--cure", "--cure-seed", "0"],
    "shortgpt-60+cure": ["--target-params", "0.6", "--method", "shortgpt", "--cure", "--cure-seed", "0"],
}.items():
    POINTS[_name] = ("compress", _args)
    for _lvl in ("int8", "int4"):
        POINTS[f"{_name}+{_lvl}"] = ("quantize", _name, _lvl)
for _size in ("60MB",):
    POINTS[f"target-size {_size}"] = ("compress", ["--target-size", _size, "--cure-seed", "0"])
    # the best peer at 60% given the same byte budget and the same rule (int4 + upgrades, its own search, the cure)
    POINTS[f"shortgpt+cure at {_size}"] = ("compress", ["--target-size", _size, "--method", "shortgpt", "--cure",
                                                         "--cure-seed", "0"])


def family(name: str) -> str:
    return name.split("+")[0].split("-")[0] if not name.startswith("target-size") else "target-size"


def data_dir() -> Path:
    return Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data")) / "corpora" / "austen"


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


def foldgpt(*args: str) -> list[str]:
    return [sys.executable, "-m", "foldgpt.cli", *args]


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env())


def evaluate(model: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "eval.json"
        run(foldgpt("eval", model, "--text", str(data_dir() / "austen_prideprejudice.txt"), "--seq-len", "512",
                    "--max-tokens", "16384", "--json", str(out)))
        return json.loads(out.read_text())[0]


def folder_bytes(folder: Path) -> dict:
    weights = folder / "model.safetensors"
    return {"weights_bytes": weights.stat().st_size}


def make_point(name: str, work: Path) -> dict:
    how = POINTS[name]
    t = time.perf_counter()
    row: dict = {"name": name, "family": family(name), "quant": "none"}
    if how[0] == "dense":
        folder = Path(subprocess.run([sys.executable, "-c", "from foldgpt.models import resolve; "
                                      f"print(resolve({MODEL!r}))"], check=True, env=env(), capture_output=True,
                                     text=True).stdout.strip().splitlines()[-1])
        row["command"] = "(the base model)"
        source = MODEL
    elif how[0] == "compress":
        folder = work / name.replace(" ", "_")
        text = [str(data_dir() / f"austen_{n}.txt") for n in CALIB]
        cmd = foldgpt("compress", MODEL, "--text", *text, "--out", str(folder), "--overwrite", *how[1])
        run(cmd)
        summary = json.loads((folder / "summary.json").read_text())
        row.update(command="foldgpt compress smollm2-135m --text <five novels> " + " ".join(how[1]),
                   calib_loss=summary["calib_loss"], params_ratio=summary["params_ratio"],
                   compress_seconds=round(time.perf_counter() - t, 1))
        if "quantization" in summary:
            row["quant"] = summary["quantization"]["level"] + (
                "+int8" if summary["quantization"].get("int8_matrices") else "")
            row["int8_matrices"] = len(summary["quantization"].get("int8_matrices", []))
        if "target_size" in summary:
            row["budget_bytes"] = summary["target_size"]["budget_bytes"]
            row["target_params"] = summary["target_size"]["target_params"]
        source = str(folder)
    else:
        _, src, level = how
        source_folder = MODEL if src == "dense" else str(work / src)
        if src != "dense" and not (work / src / "summary.json").exists():
            raise SystemExit(f"{name} quantizes {src}'s folder, which is not in {work}: make {src} first")
        folder = work / name.replace(" ", "_")
        run([sys.executable, "-c", "import sys; from foldgpt.quant import quantize_folder; "
             "quantize_folder(sys.argv[1], sys.argv[2], sys.argv[3], overwrite=True)", source_folder, str(folder),
             level])
        row.update(quant=level, command=f"quant.quantize_folder(<{src}>, OUT, {level!r})")
        source = str(folder)
    ev = evaluate(source)
    row.update(folder_bytes(folder), unique_params=ev["unique_params"], perplexity=ev["perplexity"], nll=ev["nll"],
               tokens=ev["tokens"], seconds=round(time.perf_counter() - t, 1))
    return row


def shown(row: dict) -> str:
    """How a point was made, as the table shows it (paths relative to the checkout)."""
    how = POINTS[row["name"]]
    if how[0] == "quantize":
        return f"`quant.quantize_folder(<{how[1]}>, OUT, {how[2]!r})`"
    if how[0] == "compress":
        return "`foldgpt compress smollm2-135m --text <five novels> " + " ".join(
            a.replace(str(ROOT) + "/", "") for a in how[1]) + "`"
    return "the base model"


def render(out: Path) -> None:
    rows = [json.loads(p.read_text()) for p in sorted((out / "points").glob("*.json"))]
    rows.sort(key=lambda r: r["weights_bytes"])
    best = float("inf")
    lines = ["| point | quantization | weights MB | unique params | PPL P&P | Pareto | how |",
             "|---|---|---:|---:|---:|:---:|---|"]
    for r in rows:  # sorted by bytes: a point is on the front when it beats every smaller one
        front = r["perplexity"] < best
        best = min(best, r["perplexity"])
        name = f"**{r['name']}**" if r["family"] == "target-size" else r["name"]
        lines.append(f"| {name} | {r['quant']} | {r['weights_bytes'] / 1e6:.1f} | {r['unique_params'] / 1e6:.1f}M | "
                     f"{r['perplexity']:.2f} | {'yes' if front else ''} | {shown(r)} |")
    checks = []
    for r in rows:
        if r["family"] != "target-size":
            continue
        budget = r["budget_bytes"]
        others = [o for o in rows if o is not r and o["weights_bytes"] <= budget]
        beaten = [o["name"] for o in others if o["perplexity"] <= r["perplexity"]]
        within = "within" if r["weights_bytes"] <= budget else "OVER"
        checks.append(f"- {r['name']}: weights {r['weights_bytes'] / 1e6:.1f} MB ({within} the budget), "
                      f"PPL {r['perplexity']:.2f}; "
                      + (f"lower than all {len(others)} other points at or under {budget / 1e6:.0f} MB" if not beaten
                         else f"NOT lower than {', '.join(beaten)}"))
    text = (f"# Bytes on disk vs perplexity: {MODEL}\n\n" + "\n".join(lines) + "\n\n"
            + "\n".join(checks) + "\n\nPPL P&P: the first 16,384 tokens of Pride and Prejudice (held out from the five "
            "calibration novels), 512-token windows. weights MB: model.safetensors (10^6 bytes). Regenerate with "
            "`python bench/pareto.py` (docs/size.md).\n")
    (out / "pareto.md").write_text(text)
    plot(rows, out / "pareto.png")
    print(text)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"dense": "black", "foldgpt": "tab:blue", "sleb": "tab:orange", "shortgpt": "tab:green",
              "target-size": "tab:red"}
    markers = {"none": "o", "int8": "s", "int4": "^", "int4+int8": "D"}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in rows:
        ax.scatter(r["weights_bytes"] / 1e6, r["perplexity"], c=colors.get(r["family"], "gray"),
                   marker=markers.get(r["quant"], "o"), s=70 if r["family"] == "target-size" else 40, zorder=3)
        ax.annotate(r["name"], (r["weights_bytes"] / 1e6, r["perplexity"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    front, best = [], float("inf")
    for r in sorted(rows, key=lambda r: r["weights_bytes"]):
        if r["perplexity"] < best:
            best = r["perplexity"]
            front.append((r["weights_bytes"] / 1e6, r["perplexity"]))
    ax.step(*zip(*front), where="post", color="gray", lw=0.8, ls="--", label="Pareto front", zorder=1)
    for r in rows:
        if r.get("budget_bytes"):
            ax.axvline(r["budget_bytes"] / 1e6, color="tab:red", lw=0.6, ls=":", zorder=0)
    for fam, c in colors.items():
        ax.scatter([], [], c=c, label=fam)
    for q, m in markers.items():
        ax.scatter([], [], c="white", edgecolors="black", marker=m, label=q)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("weights on disk (MB, log)")
    ax.set_ylabel("perplexity on Pride and Prejudice (log)")
    ax.set_title(f"{MODEL}: bytes on disk vs held-out perplexity (lower left is better)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / f"pareto_{MODEL}"))
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "foldgpt" / "pareto"),
                    help="where the compressed folders are kept")
    ap.add_argument("--only", default=None, help="comma list of points (default: all): " + ", ".join(POINTS))
    ap.add_argument("--render", action="store_true", help="only write the table and the plot")
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    (out / "points").mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(POINTS)
    unknown = [n for n in names if n not in POINTS]
    if unknown:
        raise SystemExit(f"unknown points {unknown}; known: {', '.join(POINTS)}")
    if not args.render:
        for name in names:
            path = out / "points" / f"{name.replace(' ', '_')}.json"
            if path.exists():
                print(f"skip {name} (done)", flush=True)
                continue
            row = make_point(name, work)
            path.write_text(json.dumps(row, indent=2) + "\n")
            print(json.dumps(row), flush=True)
    render(out)


if __name__ == "__main__":
    main()
