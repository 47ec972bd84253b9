"""ExecuTorch export (foldgpt.runtimes.executorch_export): each shared matrix stored once, run with ExecuTorch's
Python runtime against the folded model; the CLI's one-line errors.

The folded models are test_runtimes' (tiny Llama and Gemma-3, hidden 256, an alpha child and a shared child), wide
enough that the program's own bytes are small next to the weights, so "file size within 5% of the unique-parameter
bytes" says that the shared matrices (and the tied embedding) are stored once. Lowering to XNNPACK takes most of
the time, so each family is exported once in fp32 and once in int8 (24 tokens: longer than the Gemma's sliding
window of 16)."""

import importlib.util

import pytest
import torch
from test_runtimes import KINDS, dense_param_bytes, folded  # noqa: F401  (folded: the module-scoped fixture)

import foldgpt
from foldgpt.cli import main
from foldgpt.errors import FoldGPTError

SEQ = 24
HAVE_EXECUTORCH = importlib.util.find_spec("executorch") is not None
needs_executorch = pytest.mark.skipif(not HAVE_EXECUTORCH, reason="executorch is not installed "
                                      "(pip install 'foldgpt[executorch]')")


@pytest.fixture(scope="module")
def pte_files(folded, tmp_path_factory):  # noqa: F811
    if not HAVE_EXECUTORCH:
        pytest.skip("executorch is not installed (pip install 'foldgpt[executorch]')")
    root = tmp_path_factory.mktemp("pte")
    d, _ = folded["llama"]
    assert main(["export", str(d), "--executorch", str(root / "llama.pte"), "--seq-len", str(SEQ)]) == 0
    out = {"llama": root / "llama.pte"}
    out["gemma3"] = foldgpt.api.export(folded["gemma3"][0], root / "gemma3.pte", "executorch", seq_len=SEQ)
    assert main(["export", str(folded["gemma3"][0]), "--executorch", str(root / "gemma3-int8.pte"), "--int8",
                 "--seq-len", str(SEQ)]) == 0
    out["gemma3-int8"] = root / "gemma3-int8.pte"
    out["llama-int8"] = foldgpt.api.export(d, root / "llama-int8.pte", "executorch", int8=True, seq_len=SEQ)
    return out


def stored_weight_bytes(pte) -> int:
    """Bytes of the tensors a .pte stores: the program's constants and the delegates' named data (XNNPACK's
    weights, scales and norms); the rest of the file is the program and the delegates' graphs."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte = deserialize_pte_binary(pte.read_bytes())
    return (sum(len(b.storage) for b in pte.program.constant_buffer)
            + sum(len(b) for b in pte.named_data.buffers))


@needs_executorch
@pytest.mark.parametrize("kind", list(KINDS))
def test_executorch_stores_each_shared_matrix_once_and_matches_the_folded_model(folded, pte_files, kind):  # noqa: F811
    from foldgpt.runtimes.executorch_export import check_executorch

    d, model = folded[kind]
    res = check_executorch(d, pte_files[kind], n_windows=2)
    assert res["seq_len"] == SEQ and not res["dynamic"] and not res["int8"], res
    assert res["max_abs_diff"] < 1e-3, res
    assert abs(res["file_bytes"] - res["unique_param_bytes"]) <= 0.05 * res["unique_param_bytes"], res
    assert res["file_bytes"] < 0.8 * dense_param_bytes(model)  # the same model with its copies expanded
    assert res["rss_bytes"] > 0 and res["tokens_per_s"] > 0  # measured in a fresh process


@needs_executorch
@pytest.mark.parametrize("kind", list(KINDS))
def test_executorch_int8_stores_each_matrix_once_and_keeps_perplexity(folded, pte_files, kind, text_file):  # noqa: F811
    """int8: the tied embedding once (the lookup's int8 table, which the LM head reads too), the low-rank factors in
    int8: the stored tensors within 5% of the unique-parameter bytes at 1 byte per parameter (per-channel scales and
    fp32 norms are the rest). The program and the delegates' graphs (~0.15 MB) are 15% of these tiny files, so the
    file is held to the tensors plus that; on SmolLM2 the file is within 5% (docs/runtimes.md). Perplexity on text
    stays close to the fp32 model's (max-abs logits move at int8; a broken head would move them far more)."""
    from foldgpt.runtimes.executorch_export import check_executorch

    d, _ = folded[kind]
    pte = pte_files[f"{kind}-int8"]
    res = check_executorch(d, pte, n_windows=2, text=text_file.read_text())
    assert res["int8"], res
    unique, stored = res["unique_param_bytes"], stored_weight_bytes(pte)
    assert abs(stored - unique) <= 0.05 * unique and res["file_bytes"] < stored + 250_000, (stored, res)
    assert abs(res["ppl"] / res["ppl_reference"] - 1) < 0.02 and res["max_abs_diff"] < 0.5, res


@needs_executorch
def test_executorch_windows_must_fit_the_program(folded, pte_files):  # noqa: F811
    from foldgpt.runtimes.executorch_export import check_executorch, program_info

    assert program_info(pte_files["llama"]) == {"seq_len": SEQ, "dynamic": False, "vocab_size": 320, "int8": False}
    with pytest.raises(FoldGPTError, match="do not fit the program"):
        check_executorch(folded["llama"][0], pte_files["llama"], seq_len=SEQ - 1)


def test_pooled_means_compute_the_same_norm():
    """The RMSNorm rewrite (mean over the last dim -> a 4-D average) leaves the exported function unchanged."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from foldgpt.runtimes.executorch_export import pool_last_dim_means

    norm = LlamaRMSNorm(64).eval()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(0))
    program = torch.export.export(norm, (x,))
    assert pool_last_dim_means(program) == 1
    means = [n for n in program.graph.nodes if n.target == torch.ops.aten.mean.dim]
    assert [n.args[1] for n in means] == [[2, 3]]
    torch.testing.assert_close(program.module()(x), norm(x), rtol=1e-5, atol=1e-6)


# ---- CLI ----------------------------------------------------------------------------------------------------
def test_missing_executorch_is_one_line_and_writes_nothing(folded, tmp_path, capsys, monkeypatch):  # noqa: F811
    d, _ = folded["llama"]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "executorch" else real(name, *a))
    assert main(["export", str(d), "--executorch", str(tmp_path / "m.pte")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("foldgpt: error:"), err
    assert "pip install 'foldgpt[executorch]'" in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_bad_executorch_input_is_one_line(folded, tmp_path, capsys):  # noqa: F811
    d, _ = folded["llama"]
    (tmp_path / "taken.pte").write_text("x")
    for argv in (["export", str(d), "--executorch", str(tmp_path / "taken.pte")],  # exists, no --overwrite
                 ["export", str(d), "--executorch", str(tmp_path / "wrong.onnx")],  # suffix
                 ["export", str(d), "--onnx", str(tmp_path / "m.onnx"), "--seq-len", "32"],  # --seq-len elsewhere
                 ["export", str(d), "--executorch", str(tmp_path / "m.pte"), "--seq-len", "1"],
                 ["export", str(d), "--executorch", str(tmp_path / "m.pte"), "--seq-len", "100000"],
                 ["export", str(tmp_path), "--executorch", str(tmp_path / "m.pte")]):  # not a model folder
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("foldgpt: error:"), (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.pte"]
    assert (tmp_path / "taken.pte").read_text() == "x"


def test_int8_quantizes_each_shared_matrix_once(folded):  # noqa: F811
    """--int8's quantization step: a parent's Linear that its children run by reference is quantized once and stays
    shared, the children's low-rank factors are int8 too, and the tied LM head reads the embedding's int8 table."""
    pytest.importorskip("torchao", reason="torchao is not installed (pip install 'foldgpt[executorch]')")
    from torchao.quantization import IntxUnpackedToInt8Tensor

    from foldgpt.checkpoint.folded import load_folded
    from foldgpt.checkpoint.modeling_foldgpt import SharedLinear
    from foldgpt.runtimes.executorch_export import TiedInt8Head, _quantize_int8, linear_form

    model, _ = load_folded(folded["llama"][0])
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), linear_form(model):
        ref = model(input_ids=ids).logits
        _quantize_int8(model)
        out = model(input_ids=ids).logits
    children = [m for m in model.modules() if isinstance(m, SharedLinear)]
    assert children and all(isinstance(c.base.weight, IntxUnpackedToInt8Tensor) for c in children)
    factors = [getattr(c, f) for c in children if c.rank > 0 for f in ("lora_A", "lora_B")]
    assert factors and all(isinstance(f, IntxUnpackedToInt8Tensor) for f in factors)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb.weight, IntxUnpackedToInt8Tensor)
    assert isinstance(head, TiedInt8Head) and head.embedding is emb
    assert (out - ref).abs().max().item() < 0.5
