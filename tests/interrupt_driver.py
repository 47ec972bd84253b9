"""`foldgpt` runs stopped at chosen stages, for test_interrupts.py.

    python interrupt_driver.py SPEC.json

imports foldgpt (and torch) once, then forks one process per entry of SPEC.json ({"stage", "args", "tmpdir",
"stderr", "pid", "status"}): each runs `foldgpt.cli.main(args)` with its stderr in the file `stderr`, TMPDIR
`tmpdir`, and one function wrapped so that when the run gets there it prints "REACHED STAGE" and sleeps, for the
test to send a signal (or SIGKILL) at a known point of a real run. This process writes each child's process id to
the file `pid` and, once the child ends, its exit code (negative: the signal that killed it) to `status`.
The stages, and where they stop (just before the named function runs):

    loading  after the model loaded, before its adapter is looked up (pipeline.prepare, stage 1)
    search   before the search commits its first step (methods/search.py, stage 3)
    cure     before the first distillation loss, the teacher cache filled on disk (stages/cure.py, stage 4)
    saving   before report.md is written, the weights already in the staging folder (stage 6)
"""

import importlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

PLANTS = {
    "loading": ("foldgpt.pipeline", None, "get_adapter"),
    "search": ("foldgpt.methods.search", "_Scorer", "commit"),
    "cure": ("foldgpt.stages.cure", None, "_distill_loss"),
    "saving": ("foldgpt.report", None, "write_report"),
}


def plant(stage: str) -> None:
    module, cls, name = PLANTS[stage]
    owner = importlib.import_module(module)
    if cls is not None:
        owner = getattr(owner, cls)
    real = getattr(owner, name)

    def stop(*args, **kwargs):
        print(f"REACHED {stage}", file=sys.stderr, flush=True)
        time.sleep(300)  # the test signals or kills the process here
        return real(*args, **kwargs)

    setattr(owner, name, stop)


def child(item: dict) -> None:
    """The forked process: run the command, then leave without returning into the parent's code."""
    code = 1
    try:
        fd = os.open(item["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 2)
        os.close(fd)
        os.environ["TMPDIR"] = item["tmpdir"]
        tempfile.tempdir = None
        plant(item["stage"])
        from foldgpt.cli import main

        code = main(item["args"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def write(path: str, text: str) -> None:
    Path(path + ".part").write_text(text)
    os.replace(path + ".part", path)


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    for module, _, _ in PLANTS.values():  # the slow imports, once for every child
        importlib.import_module(module)
    import foldgpt.cli  # noqa: F401

    children = {}
    for item in spec:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(item)
        children[pid] = item
        write(item["pid"], str(pid))
    while children:
        pid, status = os.wait()
        write(children.pop(pid)["status"], str(os.waitstatus_to_exitcode(status)))
