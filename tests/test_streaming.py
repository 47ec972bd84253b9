import pytest
import torch

from foldgpt.adapters import get_adapter
from foldgpt.models import load_model
from foldgpt.scale.streaming import streamed_similarity
from foldgpt.stages.analysis import similarity


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_streamed_similarity_equals_in_memory(tiny_dirs, kind):
    model, _ = load_model(str(tiny_dirs[kind]))
    adapter = get_adapter(model.config)
    ids = torch.randint(3, 300, (6, 40), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1
    ref = similarity(model, adapter, ids, skip_first=True)
    got = streamed_similarity(model, adapter, ids, skip_first=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
