"""Calibration and held-out text of another kind than the Austen novels, from files every Python installation has,
so that `bench/compare_default.sh` can check whether the default's lead carries over to a user's own text.

    python bench/other_text.py code DIR     writes DIR/code_calib.txt and DIR/code_eval.txt, prints their paths

`code`: the Python standard library's own top-level modules (source code with its docstrings and comments), those
whose file name starts with a-m for calibration and n-z held out, in file-name order. The files are the running
interpreter's (`sysconfig`'s stdlib path), so the text is the same wherever the same Python version runs.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

from foldgpt.fileio import write_text_atomic


def code_text() -> tuple[str, str]:
    """(calibration, held-out): the standard library's top-level modules a-m and n-z, each file's text in turn."""
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if not p.name.startswith("_"))
    calib = [p for p in files if p.name[0].lower() <= "m"]
    held = [p for p in files if p.name[0].lower() > "m"]

    def join(paths: list[Path]) -> str:
        return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in paths)

    return join(calib), join(held)


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] != "code":
        sys.exit("usage: python bench/other_text.py code DIR")
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    calib, held = code_text()
    for name, text in (("code_calib.txt", calib), ("code_eval.txt", held)):
        write_text_atomic(out / name, text)
    print(out / "code_calib.txt", out / "code_eval.txt")


if __name__ == "__main__":
    main()
