"""Start a `foldgpt bench` rows file (OUT.rows.jsonl) from rows of finished runs, so a new run resumes from them:
a cure-only variant (`sleb[cure.seed=1]`) then re-applies the plan of its base row (from a source rows file
that carries it) instead of planning again.

    python bench/seed_rows.py --command P/part5/command.json \
        P/part5/results.json:dense,foldgpt-no-norm P/part2_results.json:sleb P/part7.rows.jsonl

Each SOURCE is a results.json (or OUT.rows.jsonl) with the methods to take after the colon; the rows must come from
runs on the same settings as `--command` (a finished run's command.json), which every seeded row is filed under.
A row of an ablation that differs from its method only in the cure (`foldgpt-no-norm`) carries that method's plan.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from render_rows import read_records


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", help="SOURCE:METHOD,METHOD... entries, then the rows file to write")
    p.add_argument("--command", required=True, help="command.json of a finished run on the same settings")
    a = p.parse_args(argv)
    *sources, out = a.sources
    if not sources:
        p.error("give at least one SOURCE:METHODS and the rows file to write")
    out = Path(out)
    if out.exists():
        sys.exit(f"error: {out} exists; remove it first (a bench resumes from it)")
    command = json.loads(Path(a.command).read_text())
    lines = []
    for spec in sources:
        path, sep, methods = spec.rpartition(":")
        if not sep or not path or not methods:
            p.error(f"{spec}: write SOURCE:METHOD,METHOD")
        wanted = methods.split(",")
        recs = [rec for rec in read_records(path) if rec["row"]["method"] in wanted]
        missing = set(wanted) - {rec["row"]["method"] for rec in recs}
        if missing:
            sys.exit(f"error: {path} has no rows for {', '.join(sorted(missing))}")
        for rec in recs:
            plan = {"plan": rec["plan"]} if "plan" in rec else {}
            lines.append(json.dumps({"command": command, "row": rec["row"], **plan}))
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    print(f"{out}: {len(lines)} rows")


if __name__ == "__main__":
    main()
