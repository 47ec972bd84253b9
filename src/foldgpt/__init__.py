"""foldgpt: make LLMs smaller by gated block removal, grouped parameter sharing and a short cure."""

__version__ = "0.1.0"

from .api import analyze, compress, evaluate, load  # noqa: E402
from .config import CompressConfig, CureConfig, FoldConfig, GateConfig  # noqa: E402
from .errors import FoldGPTError  # noqa: E402
from .plan import Plan  # noqa: E402

__all__ = ["analyze", "compress", "evaluate", "load", "CompressConfig", "CureConfig", "FoldConfig", "GateConfig",
           "FoldGPTError", "Plan", "__version__"]


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
