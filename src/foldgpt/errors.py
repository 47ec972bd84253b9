"""User-facing errors: one clear line that says what was wrong and what to do."""


class FoldGPTError(Exception):
    """An error caused by the user's input. The CLI prints its message as one line and exits 2."""
