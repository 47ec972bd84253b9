"""Interruptions leave nothing behind: SIGINT / SIGTERM at each stage of a real `foldgpt compress` end with one line
and exit 130 / 143 after removing staging folders, teacher caches and the output lock; kill -9 leaves only what the
next run removes; two runs for the same output cannot both write it; outputs follow the umask; a full disk gives
one line and no partial output.

The signalled runs are real processes of `foldgpt.cli.main`, forked after one import of torch by
tests/interrupt_driver.py, which stops each at a known stage; the run stopped while importing torch is the command
itself (python -m foldgpt.cli)."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tinymodels import sample_text, save_tiny, tiny_model

import foldgpt
from foldgpt import cli, fileio, signals
from foldgpt.errors import FoldGPTError

HERE = Path(__file__).parent
SRC = Path(foldgpt.__file__).parents[1]
FAST = ["--seq-len", "32", "--calib-seqs", "16", "--cure-steps", "1"]
KEPT = {".out.resume"}  # the resume state a compress may keep beside its output (continued by the same command)

# stage -> signal sent there; "import": the command stopped while it imports torch (python -m foldgpt.cli)
STAGES = {"import": signal.SIGINT, "loading": signal.SIGTERM, "search": signal.SIGINT, "cure": signal.SIGTERM,
          "saving": signal.SIGINT, "kill9": signal.SIGKILL}

BLOCK_TORCH = '''
import sys, time

class _StopAtTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("REACHED import", file=sys.stderr, flush=True)
            time.sleep(300)
        return None

sys.meta_path.insert(0, _StopAtTorch())
'''


def _sigint_default() -> None:
    """In a child before it starts Python: SIGINT at its default, so Python raises KeyboardInterrupt on it even when
    the tests themselves were started with SIGINT ignored (as a shell does for a command run in the background)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(autouse=True)
def _sigint_raises():
    """This process raises KeyboardInterrupt on SIGINT whatever it inherited (see _sigint_default)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]), **extra}


class Run:
    """One signalled run: its folders (runs/ holds only its output, systmp/ is its TMPDIR) and its process: forked by
    interrupt_driver.py (stopped at a stage), or for "import" the command itself (python -m foldgpt.cli) stopped
    where it first imports torch."""

    def __init__(self, root: Path, stage: str, model: Path, text: Path):
        self.stage, self.root = stage, root
        self.runs, self.tmp = root / "runs", root / "systmp"
        self.runs.mkdir(parents=True)
        self.tmp.mkdir()
        self.out = self.runs / "out"
        self.args = ["compress", str(model), "--text", str(text), "--out", str(self.out), *FAST]
        self.err, self.pid_file, self.status_file = root / "stderr.txt", root / "pid", root / "status"
        self.proc = None
        if stage == "import":
            hook = root / "hook"
            hook.mkdir()
            (hook / "sitecustomize.py").write_text(BLOCK_TORCH)
            env = _env(TMPDIR=str(self.tmp))
            env["PYTHONPATH"] = os.pathsep.join([str(hook), env["PYTHONPATH"]])
            self.proc = subprocess.Popen([sys.executable, "-m", "foldgpt.cli", *self.args], stdout=subprocess.DEVNULL,
                                         stderr=open(self.err, "w"), env=env, cwd=root,
                                         preexec_fn=_sigint_default)

    def spec(self) -> dict:
        return {"stage": "saving" if self.stage == "kill9" else self.stage, "args": self.args,
                "tmpdir": str(self.tmp), "stderr": str(self.err), "pid": str(self.pid_file),
                "status": str(self.status_file)}

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else int(self.pid_file.read_text())

    def stderr(self) -> str:
        return self.err.read_text() if self.err.exists() else ""

    def exit_code(self) -> int | None:
        if self.proc is not None:
            return self.proc.poll()
        return int(self.status_file.read_text()) if self.status_file.exists() else None

    def wait_reached(self, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while f"REACHED {self.spec()['stage']}" not in self.stderr() or not (self.proc or self.pid_file.exists()):
            assert self.exit_code() is None, f"exited {self.exit_code()} before its stage:\n{self.stderr()[-3000:]}"
            assert time.monotonic() < end, self.stderr()[-3000:]
            time.sleep(0.05)

    def stop(self, sig: int) -> int:
        os.kill(self.pid, sig)
        end = time.monotonic() + 60
        while (code := self.exit_code()) is None:
            assert time.monotonic() < end, self.stderr()[-3000:]
            time.sleep(0.05)
        return code


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupts")
    model = save_tiny(root / "llama", "llama", model=tiny_model("llama", layers=6, train_steps=20))
    text = root / "calib.txt"
    text.write_text(sample_text(20000, seed=1))
    return model, text


@pytest.fixture(scope="module")
def started(tiny, tmp_path_factory):
    """Every stage's process, started at once (the forked ones share one import of torch)."""
    model, text = tiny
    root = tmp_path_factory.mktemp("signalled")
    runs = {stage: Run(root / stage, stage, model, text) for stage in STAGES}
    spec = root / "spec.json"
    spec.write_text(json.dumps([r.spec() for r in runs.values() if r.proc is None]))
    driver = subprocess.Popen([sys.executable, str(HERE / "interrupt_driver.py"), str(spec)], env=_env(),
                              stdout=subprocess.DEVNULL, stderr=open(root / "driver.txt", "w"),
                              start_new_session=True, preexec_fn=_sigint_default)
    yield runs
    for r in runs.values():
        if r.proc is not None and r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait()
    if driver.poll() is None:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the children still running
    driver.wait()


def message_lines(stderr: str) -> list[str]:
    return [ln for ln in re.split(r"[\r\n]", stderr) if ln.startswith("foldgpt:")]


def leftovers(run: Run) -> tuple[list[str], list[str]]:
    """What is beside the output (apart from a resume state), and foldgpt's entries in the temporary folder."""
    return (sorted(p.name for p in run.runs.iterdir() if p.name not in KEPT),
            sorted(p.name for p in run.tmp.iterdir() if p.name.startswith("foldgpt")))


@pytest.mark.parametrize("stage", ["import", "loading", "search", "cure", "saving"])
def test_signal_at_each_stage(started, stage, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    run = started[stage]
    run.wait_reached()
    sig = STAGES[stage]
    if stage == "loading":  # a second run for the same output fails at once: the first holds the lock
        assert (run.runs / ".out.lock").exists()
        assert cli.main(run.args) == 2
        lines = message_lines(capsys.readouterr().err)
        assert len(lines) == 1 and "another foldgpt run" in lines[0] and "is writing" in lines[0], lines
        assert (run.runs / ".out.lock").exists()  # still the first run's
    if stage == "cure":  # what the signal must clean
        assert [p for p in run.tmp.iterdir() if p.name.startswith(f"foldgpt-teacher-{run.pid}-")]
    if stage == "saving":
        assert [p for p in run.runs.iterdir() if p.name.startswith(f".out.tmp-{run.pid}-")]
    code = run.stop(sig)
    err = run.stderr()
    assert code == 128 + sig, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = message_lines(err)
    hint = signals.HINTS["compress"]
    assert lines == [f"foldgpt: interrupted ({signal.Signals(sig).name}); {hint}"], err[-3000:]
    assert leftovers(run) == ([], []), err[-3000:]
    if stage == "import":
        assert "foldgpt.pipeline" not in err  # it stopped before any work


def test_kill9_leftovers_are_cleaned_by_the_next_run(started, tmp_path, monkeypatch, capsys):
    run = started["kill9"]
    run.wait_reached()
    pid = run.pid
    assert run.stop(signal.SIGKILL) == -signal.SIGKILL
    left = sorted(p.name for p in run.runs.iterdir())
    assert ".out.lock" in left and any(n.startswith(f".out.tmp-{pid}-") for n in left), left
    dead = run.tmp / f"foldgpt-teacher-{pid}-abcd1234"  # as a run killed in its cure leaves it
    dead.mkdir()
    (dead / "window0000000.safetensors").write_bytes(b"x")
    alive = run.tmp / f"foldgpt-teacher-{os.getpid()}-other"  # a live process's: not touched
    alive.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(run.tmp))
    old_umask = os.umask(0o027)
    try:
        assert cli.main(run.args) == 0, capsys.readouterr().err[-3000:]
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in run.runs.iterdir()) == ["out"]
    assert not dead.exists() and alive.exists()
    assert (run.out / "model.safetensors").is_file() and (run.out / "summary.json").is_file()
    assert run.out.stat().st_mode & 0o777 == 0o750
    assert {p.name: p.stat().st_mode & 0o777 for p in run.out.iterdir()} == {p.name: 0o640 for p in run.out.iterdir()}


def _assert_clean_failure(code: int, err: str, runs: Path, words: str) -> None:
    assert code == 2, err[-3000:]
    lines = message_lines(err)
    assert len(lines) == 1 and lines[0].startswith("foldgpt: error:") and words in lines[0], err[-3000:]
    assert "Traceback" not in err
    assert list(runs.iterdir()) == []


@pytest.mark.parametrize("how", ["oserror", "safetensors"])
def test_full_disk_while_saving(tiny, tmp_path, monkeypatch, capsys, how):
    from safetensors import SafetensorError

    import foldgpt.checkpoint.folded as folded

    model, text = tiny
    runs = tmp_path / "runs"
    runs.mkdir()
    if how == "oserror":  # after the weights are in the staging folder
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device", str(runs / "x" / "report.md"))

        monkeypatch.setattr("foldgpt.report.write_report", full)
    else:
        def full(*args, **kwargs):
            raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')

        monkeypatch.setattr(folded, "save_file", full)
    code = cli.main(["compress", str(model), "--text", str(text), "--out", str(runs / "out"), "--no-cure",
                     "--method", "shortgpt", *FAST])
    _assert_clean_failure(code, capsys.readouterr().err, runs, "no space left on the device")


# ---- the pieces, without a model ----------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_held_defers_to_the_end_of_the_block(sig):
    expected = KeyboardInterrupt if sig == signal.SIGINT else signals.Terminated
    done = []
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(expected), signals.terminate_raises():
        with signals.signals_held():
            os.kill(os.getpid(), sig)
            time.sleep(0.05)
            done.append(True)  # the block finished
    assert done == [True]
    assert signal.getsignal(signal.SIGTERM) == before


def test_signal_during_the_final_rename_waits_for_it(tmp_path, monkeypatch, capsys):
    real = os.replace

    def replace(src, dst):  # Ctrl-C arrives just as the output is moved into place
        os.kill(os.getpid(), signal.SIGINT)
        real(src, dst)

    out = tmp_path / "out"
    with signals.terminate_raises(), pytest.raises(KeyboardInterrupt) as caught:
        with fileio.atomic_dir(out, overwrite=False) as tmp:
            (tmp / "model.safetensors").write_text("weights")
            monkeypatch.setattr(fileio.os, "replace", replace)
    monkeypatch.setattr(fileio.os, "replace", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "model.safetensors").read_text() == "weights"
    assert signals.report(caught.value, ["compress"]) == 130
    assert message_lines(capsys.readouterr().err) == [
        f"foldgpt: interrupted (SIGINT); {out} had been written completely; nothing else was left behind"]


def test_output_appearing_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FoldGPTError, match="appeared while this run was writing"):
        with fileio.atomic_dir(out, overwrite=False) as tmp:
            (tmp / "model.safetensors").write_text("new")
            out.mkdir()
            (out / "theirs.txt").write_text("keep")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]


def test_staging_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with fileio.atomic_dir(tmp_path / "out", overwrite=False) as tmp:
            os.close(os.open(tmp / "private.bin", os.O_CREAT | os.O_WRONLY, 0o600))  # as safetensors writes
            fileio.write_text_atomic(tmp / "a.json", "{}")
            (tmp / "sub").mkdir(mode=0o700)
    finally:
        os.umask(old)
    out = tmp_path / "out"
    modes = {p.name: p.stat().st_mode & 0o777 for p in [out, *out.iterdir()]}
    assert modes == {"out": 0o755, "private.bin": 0o644, "a.json": 0o644, "sub": 0o755}


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_entries_of_gone_processes_are_removed_or_restored(tmp_path):
    dead = _dead_pid()
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / f".out.tmp-{dead}-0a1b").mkdir()
    (runs / f".out.tmp-{os.getpid()}-0a1b").mkdir()  # a live process's (this one): kept
    (runs / f".out.old-{dead}").mkdir()  # a killed --overwrite run's previous output: put back
    (runs / f".out.old-{dead}" / "model.safetensors").write_text("previous")
    (runs / f".other.tmp-{dead}-0a1b").mkdir()  # another output's: not this run's business
    with fileio.output_lock(runs / "out"):
        assert (runs / ".out.lock").exists()
    assert sorted(p.name for p in runs.iterdir()) == sorted(
        ["out", f".out.tmp-{os.getpid()}-0a1b", f".other.tmp-{dead}-0a1b"])
    assert (runs / "out" / "model.safetensors").read_text() == "previous"
    assert fileio.clean_stale(runs, ".other.tmp-") == [runs / f".other.tmp-{dead}-0a1b"]


def test_lock_creates_and_removes_missing_parents(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with fileio.output_lock(out):
        assert (out.parent / ".out.lock").exists()
        with fileio.output_lock(out):  # re-entrant within a process
            pass
        assert (out.parent / ".out.lock").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["cwd", "dot", "under_file", "file_as_folder", "exists", "holds_input",
                                  "json_folder"])
def test_check_output_before_any_work(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "model").mkdir()
    out, kw, words = {
        "cwd": (str(tmp_path), {"overwrite": True}, "current folder"),
        "dot": (".", {"overwrite": True}, "current folder"),
        "under_file": ("afile/out", {}, "which is a file"),
        "file_as_folder": ("afile", {"overwrite": True}, "is a file, not a folder"),
        "exists": ("done", {}, "already exists"),
        "holds_input": ("done", {"overwrite": True, "inputs": ["done/model"]}, "would replace the input"),
        "json_folder": ("done", {"overwrite": True, "file": True, "option": "--json"}, "is a folder"),
    }[case]
    with pytest.raises(FoldGPTError, match=words):
        fileio.check_output(out, **kw)


def test_command_line_imports_no_torch_before_main():
    code = ("import sys; sys.argv = ['/bin/foldgpt']; import foldgpt.cli; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.stdout.split() == ["False", "False"], proc.stderr[-2000:]
