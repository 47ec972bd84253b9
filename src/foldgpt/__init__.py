"""foldgpt: make LLMs smaller by gated block removal, grouped parameter sharing and a short cure."""

import sys
from importlib import import_module
from pathlib import Path

__version__ = "0.1.0"

# the public names, imported on first use (PEP 562): `import foldgpt.cli` stays free of torch
_LAZY = {
    "analyze": "api", "compress": "api", "evaluate": "api", "load": "api",
    "CompressConfig": "config", "CureConfig": "config", "EvalConfig": "config", "FoldConfig": "config",
    "GateConfig": "config", "RankingConfig": "config",
    "FoldGPTError": "errors",
    "Plan": "plan",
}

__all__ = [
    "CompressConfig",
    "CureConfig",
    "EvalConfig",
    "FoldConfig",
    "FoldGPTError",
    "GateConfig",
    "Plan",
    "RankingConfig",
    "__version__",
    "analyze",
    "compress",
    "evaluate",
    "load",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def _started_as_command() -> bool:
    """Whether this import is the start of the `foldgpt` command (its script, or python -m foldgpt.cli, as torchrun
    runs it): the command imports torch itself, where Ctrl-C ends in one line (cli.main)."""
    if Path((getattr(sys, "argv", None) or [""])[0]).name in ("foldgpt", "foldgpt.exe", "foldgpt-script.py"):
        return True
    argv = getattr(sys, "orig_argv", [])
    return "-m" in argv and argv[argv.index("-m") + 1 :][:1] == ["foldgpt.cli"]


if _started_as_command():  # Ctrl-C from here on ends in one line (cli.main takes over once it runs)
    from .signals import quiet_until_main as _quiet_until_main

    _quiet_until_main()
else:  # `import foldgpt` makes the Auto classes load folded checkpoints
    from .checkpoint.auto import register_auto_classes as _register_auto_classes

    _register_auto_classes()
