"""Auto registration: `import foldgpt` makes AutoConfig / AutoModelForCausalLM load folded checkpoints natively."""


# loggers that print at torchao's import (transformers imports torchao wherever it is installed): its CUDA-only
# extension libraries failing to load on a CPU machine, and torch's notice about the enums torchao registers
NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_torchao() -> None:
    """Silence the warnings torchao prints when it is imported; neither concerns foldgpt's runs."""
    import logging

    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def register_auto_classes() -> None:
    """Register the folded model type with transformers' Auto classes (idempotent)."""
    quiet_torchao()  # before transformers imports torchao
    from transformers import AutoConfig, AutoModelForCausalLM

    from .modeling_foldgpt import FoldGPTConfig, FoldGPTForCausalLM

    try:
        AutoConfig.register("foldgpt", FoldGPTConfig)
        AutoModelForCausalLM.register(FoldGPTConfig, FoldGPTForCausalLM)
    except ValueError:  # already registered (module reloaded)
        pass
