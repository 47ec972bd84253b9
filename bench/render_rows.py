"""Render the rows a `foldgpt bench` run has finished so far (its OUT.rows.jsonl) as a table and plots,
e.g. while it is still running or after it was stopped:

    python bench/render_rows.py bench/results/table_smollm2-135m.rows.jsonl bench/results/table_smollm2-135m_partial

Several files (parts of one table run by separate commands on the same data) are merged in the order
given: OUT.rows.jsonl files of running or stopped runs, or the results.json of a finished one; a row
(method, target, cure) that appears twice, such as the dense row, is kept once (the first given).
`--rename FILE:OLD=NEW` relabels the method OLD of the rows from FILE (e.g. a row measured under a name whose
meaning later changed: `--rename parts/part1.rows.jsonl:foldgpt=foldgpt-gates`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from foldgpt.bench import results_markdown
from foldgpt.report import write_bench_figures


def read_records(path: str | Path) -> list[dict]:
    """The {"command", "row"} records of an OUT.rows.jsonl, or of a finished run's results.json (command None)."""
    text = Path(path).read_text()
    if str(path).endswith(".json"):  # a finished run's results.json: rows without the command
        return [{"command": None, "row": row} for row in json.loads(text)]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rows", nargs="+", help="one or more OUT.rows.jsonl files, then the output folder")
    p.add_argument("--rename", action="append", default=[], metavar="FILE:OLD=NEW",
                   help="relabel method OLD as NEW in the rows read from FILE (repeatable)")
    a = p.parse_args(argv)
    renames: dict[tuple[str, str], str] = {}
    for spec in a.rename:
        path, _, pair = spec.rpartition(":")
        cut = pair.find("]=") + 1 if "]=" in pair else pair.find("=")  # OLD may be a variant with "=" inside
        old, sep, new = (pair[:cut], "=", pair[cut + 1:]) if cut > 0 else (pair, "", "")
        if not path or not sep:
            p.error(f"--rename {spec}: write FILE:OLD=NEW")
        renames[(path, old)] = new
    *files, a.out = a.rows
    if not files:
        p.error("give at least one rows file and an output folder")
    recs, seen = [], set()
    for f in files:
        for rec in read_records(f):
            rec["row"]["method"] = renames.get((f, rec["row"]["method"]), rec["row"]["method"])
            key = (rec["row"]["method"], rec["row"]["target"], rec["row"]["cure"])
            if key not in seen:
                seen.add(key)
                recs.append(rec)
    rows = sorted((r["row"] for r in recs), key=lambda row: -row["target"])  # dense, then each target (stable)
    model = next((r["command"]["model"] for r in recs if r["command"]), "model")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    commands = list({json.dumps(r["command"], sort_keys=True): r["command"] for r in recs if r["command"]}.values())
    (out / "commands.json").write_text(json.dumps(commands, indent=2))
    (out / "results.md").write_text(results_markdown(rows, model))
    write_bench_figures(rows, out)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
