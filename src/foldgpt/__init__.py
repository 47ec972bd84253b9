"""foldgpt: make LLMs smaller by gated block removal, grouped parameter sharing and a short cure."""

__version__ = "0.1.0"

from .api import analyze, compress, evaluate, load
from .checkpoint.auto import register_auto_classes as _register_auto_classes
from .config import CompressConfig, CureConfig, EvalConfig, FoldConfig, GateConfig, RankingConfig
from .errors import FoldGPTError
from .plan import Plan

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


_register_auto_classes()
