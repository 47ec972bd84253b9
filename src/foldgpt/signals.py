"""Interruptions: Ctrl-C (SIGINT) and SIGTERM end a command with one line and exit 130 / 143.

SIGINT raises KeyboardInterrupt (Python's own handler) and, while the command line runs, SIGTERM raises
`Terminated`; both are BaseExceptions, so no `except Exception` on the way swallows them, and every `finally` and
context manager between the signal and `cli.main` runs: staging folders, teacher caches and the output lock are
removed on the way out (fileio.py). `signals_held()` defers both signals around steps that must not stop halfway
(the final rename of an output, the removal of a staging folder).

This module imports nothing heavy: the command line uses it before torch is imported.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)

# what the last line says after "interrupted (SIG...)": by default that nothing was written
DEFAULT_HINT = "no output was written and temporary files were removed; run the same command again to start over"
HINTS = {
    "bench": "rows already finished are kept beside the output; run the same command with --resume to continue",
    "compress": "no output was written and temporary files were removed; finished stages are kept beside the "
                "output: run the same command again to continue (--fresh starts over)",
}
_written: list[str] = []  # outputs this command finished (a signal may come after the last one is in place)


def note_written(path) -> None:
    """Record that the output `path` is complete, so that an interruption afterwards does not say it was not."""
    _written.append(str(path))


class Terminated(BaseException):
    """SIGTERM, raised in the main thread while a command runs (as KeyboardInterrupt is for SIGINT)."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _before_main(signum, frame):
    """A signal while the command's first modules load, before cli.main: nothing was done yet; one line, exit."""
    _report(Terminated(signum), None)
    os._exit(exit_code(Terminated(signum)))


def quiet_until_main() -> None:
    """Installed by `import foldgpt` when it starts the `foldgpt` command: until cli.main takes over (terminate_raises),
    SIGINT and SIGTERM end the process with the same one line instead of a traceback or silence. Signals the
    process was started to ignore (a background job's SIGINT) stay ignored."""
    if not _main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _before_main)
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _before_main)


@contextmanager
def terminate_raises() -> Iterator[None]:
    """SIGTERM raises Terminated inside the block (the previous handler comes back afterwards). SIGINT keeps
    Python's default handler (KeyboardInterrupt). A signal the process was started to ignore stays ignored."""
    if not _main_thread():
        yield
        return
    _written.clear()
    if signal.getsignal(signal.SIGINT) is _before_main:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    old = signal.getsignal(signal.SIGTERM)
    if old is _before_main:
        old = signal.SIG_DFL
    if old != signal.SIG_IGN:  # started to ignore it: keep ignoring
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


@contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM received inside the block take effect when it ends (a rename that must not stop
    halfway, a cleanup that must finish). Outside the main thread signals are not delivered anyway."""
    if not _main_thread():
        yield
        return
    got: list[int] = []

    def defer(signum, frame):
        got.append(signum)

    old = {}
    for s in SIGNALS:
        handler = signal.getsignal(s)
        if handler is None or handler == signal.SIG_IGN:  # not set from Python, or ignored: leave it
            continue
        old[s] = handler
        signal.signal(s, defer)
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if got:
            _deliver(got[0], old.get(got[0]))


def _deliver(signum: int, handler) -> None:
    """Act on a signal that was held: call its handler (which raises), or re-send it for the default action."""
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signum)


def exit_code(exc: BaseException) -> int:
    """128 + the signal number, as shells report a process stopped by a signal: 130 (SIGINT), 143 (SIGTERM).
    KeyboardInterrupt is SIGINT; Terminated carries its signal."""
    return 128 + (exc.signum if isinstance(exc, Terminated) else signal.SIGINT)


def command_of(argv: list[str] | None) -> str | None:
    """The subcommand in a command line (the first word that is not an option)."""
    words = sys.argv[1:] if argv is None else argv
    return next((w for w in words if not w.startswith("-")), None)


def report(exc: BaseException, argv: list[str] | None = None) -> int:
    """Print the one line an interruption ends with (further signals ignored meanwhile); return the exit code."""
    if not _main_thread():
        return _report(exc, argv)
    old = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    try:
        return _report(exc, argv)
    finally:
        for s, handler in old.items():
            if handler is not None:
                signal.signal(s, handler)


def _report(exc: BaseException, argv: list[str] | None) -> int:
    name = signal.Signals(exc.signum).name if isinstance(exc, Terminated) else "SIGINT"  # Terminated: any signal
    hint = HINTS.get(command_of(argv) or "", DEFAULT_HINT)
    if _written:
        hint = f"{', '.join(_written)} had been written completely; nothing else was left behind"
    try:  # from the start of the line a progress bar (or the terminal's "^C") may have left
        clear = "\r\x1b[K" if sys.stderr.isatty() else "\r"
        sys.stderr.write(f"{clear}foldgpt: interrupted ({name}); {hint}\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr already closed (the terminal went away)
        pass
    return exit_code(exc)
