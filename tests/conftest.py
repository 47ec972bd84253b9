import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
sys.path.insert(0, str(Path(__file__).parent))

from tinymodels import sample_text, save_tiny, tiny_model

KINDS = ["llama", "qwen2", "gemma3"]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """One tiny trained model folder per family, plus variants with a planted useless layer."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for kind in KINDS:
        model = tiny_model(kind, layers=6)
        out[kind] = save_tiny(root / kind, kind, model=model)
        out[f"{kind}-zero2"] = save_tiny(root / f"{kind}-zero2", kind, zero_layer=2, model=model)
    return out


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(sample_text(30000, seed=1))
    return p


@pytest.fixture(scope="session")
def eval_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "eval.txt"
    p.write_text(sample_text(6000, seed=2))
    return p
