"""Render the rows a `foldgpt bench` run has finished so far (its OUT.rows.jsonl) as a table and plots,
e.g. while it is still running or after it was stopped:

    python bench/render_rows.py bench/results/table_smollm2-135m.rows.jsonl bench/results/table_smollm2-135m_partial
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from foldgpt.bench import _plots, results_markdown


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rows")
    p.add_argument("out")
    a = p.parse_args(argv)
    recs = [json.loads(line) for line in Path(a.rows).read_text().splitlines() if line.strip()]
    rows = [r["row"] for r in recs]
    model = recs[0]["command"]["model"]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "command.json").write_text(json.dumps(recs[0]["command"], indent=2))
    (out / "results.md").write_text(results_markdown(rows, model))
    _plots(rows, out)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
