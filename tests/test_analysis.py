import math

import torch

from foldgpt.adapters import get_adapter
from foldgpt.models import load_model
from foldgpt.stages.analysis import angular_distance, block_influence, capture_hidden, cosine_matrix_sums, similarity


def test_last_block_output_is_taken_before_final_norm(tiny_dirs):
    model, _ = load_model(str(tiny_dirs["llama"]))
    adapter = get_adapter(model.config)
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad(), capture_hidden(model, adapter) as store:
        out = model(input_ids=ids, output_hidden_states=True)
    assert len(store) == 7
    torch.testing.assert_close(model.model.norm(store[-1]), out.hidden_states[-1])
    assert not torch.allclose(store[-1], out.hidden_states[-1])
    torch.testing.assert_close(store[0], model.model.embed_tokens(ids))


def test_similarity_math_on_known_vectors():
    h = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]], [[0.0, 1.0]]])  # (L+1=3, N=1, D=2)
    s, n = cosine_matrix_sums(h)
    sim = s / n
    assert math.isclose(sim[0, 1].item(), 1 / math.sqrt(2), rel_tol=1e-6)
    assert math.isclose(sim[0, 2].item(), 0.0, abs_tol=1e-7)
    bi = block_influence(sim)
    assert torch.allclose(bi, torch.tensor([1 - 1 / math.sqrt(2)] * 2))
    assert math.isclose(angular_distance(sim)[0, 2].item(), 0.5, rel_tol=1e-6)


def test_planted_identity_block_has_zero_influence(tiny_dirs):
    model, _ = load_model(str(tiny_dirs["llama-zero2"]))
    adapter = get_adapter(model.config)
    batches = torch.randint(3, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    sim = similarity(model, adapter, batches, skip_first=False)
    bi = block_influence(sim)
    assert bi.argmin().item() == 2 and abs(bi[2].item()) < 1e-5
