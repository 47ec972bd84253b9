"""foldgpt: make LLMs smaller by gated block removal, grouped parameter sharing and a short cure."""

__version__ = "0.1.0"

from .api import analyze, compress, evaluate, load
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


def _register_auto_classes() -> None:
    """`import foldgpt` makes AutoConfig / AutoModelForCausalLM load folded checkpoints natively."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .modeling_foldgpt import FoldGPTConfig, FoldGPTForCausalLM

    try:
        AutoConfig.register("foldgpt", FoldGPTConfig)
        AutoModelForCausalLM.register(FoldGPTConfig, FoldGPTForCausalLM)
    except ValueError:  # already registered (module reloaded)
        pass


_register_auto_classes()
