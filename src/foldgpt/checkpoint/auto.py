"""Auto registration: `import foldgpt` makes AutoConfig / AutoModelForCausalLM load folded checkpoints natively."""


def register_auto_classes() -> None:
    """Register the folded model type with transformers' Auto classes (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .modeling_foldgpt import FoldGPTConfig, FoldGPTForCausalLM

    try:
        AutoConfig.register("foldgpt", FoldGPTConfig)
        AutoModelForCausalLM.register(FoldGPTConfig, FoldGPTForCausalLM)
    except ValueError:  # already registered (module reloaded)
        pass
