"""On-device exports (foldgpt.runtimes): ONNX with each shared matrix stored once, run in onnxruntime; dense GGUF
read back by transformers' GGUF loader; the CLI's one-line errors when a runtime is missing or the input is bad.

The models are tiny but wide enough (hidden 256) that the ONNX graph's own bytes are small next to the weights,
so "file size within 5% of the unique-parameter bytes" says that the shared matrices are stored once."""

import importlib.util

import pytest
import torch
from helpers import GEMMA_KINDS, fast_config, wide_config
from tinymodels import make_tokenizer

import foldgpt
from foldgpt import Plan
from foldgpt.cli import main
from foldgpt.errors import FoldGPTError

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]
LAYERS = 4
# transformers model_type, layer kinds (Gemma-3: every 2nd layer global), groups, deleted sub-blocks; the first
# child of the first group runs its parent's matrices scaled (alpha W + B A), the last child of the last group in
# full (W + B A)
KINDS = {
    "llama": ("llama", [], [[1, 2, 3]], ["0.mlp"]),
    "gemma3": ("gemma3_text", GEMMA_KINDS, [[0, 2], [1, 3]], []),
}



@pytest.fixture(scope="module")
def folded(tmp_path_factory, text_file):
    """Per family: a folded folder with an alpha child (alpha W + B A) and a shared child (W + B A), no cure;
    and the folded model."""
    from transformers import AutoModelForCausalLM

    out = {}
    for kind, (model_type, kinds, groups, removed) in KINDS.items():
        root = tmp_path_factory.mktemp(f"rt-{kind}")
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(wide_config(kind), dtype=torch.float32)
        base.save_pretrained(root / "base")
        make_tokenizer().save_pretrained(root / "base")
        alpha_child, shared_child = groups[0][1], groups[-1][-1]
        plan = Plan(num_layers=LAYERS, model_type=model_type, removed=removed, groups=groups, layer_kinds=kinds,
                    adapter_rank=2, adapter_init="svd",
                    child_modes={str(alpha_child): {lin: "alpha" for lin in LINEARS},
                                 str(shared_child): {lin: "shared" for lin in LINEARS}})
        res = foldgpt.compress(str(root / "base"), [str(text_file)], root / "folded", fast_config(cure=False),
                               plan=plan)
        out[kind] = (root / "folded", res.model)
    return out


def dense_param_bytes(model) -> int:
    from foldgpt.checkpoint.export import to_dense

    return sum(p.numel() for p in to_dense(model).parameters()) * 4


# ---- ONNX -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_files(folded, tmp_path_factory):
    pytest.importorskip("onnxruntime", reason="onnxruntime has no wheel for this platform")
    pytest.importorskip("onnxscript", reason="onnxscript (torch's ONNX exporter) is not installed")
    root = tmp_path_factory.mktemp("onnx")
    return {kind: foldgpt.api.export(d, root / f"{kind}.onnx", "onnx") for kind, (d, _) in folded.items()}


@pytest.mark.parametrize("kind", list(KINDS))
def test_onnx_stores_each_shared_matrix_once_and_matches_the_folded_model(folded, onnx_files, kind):
    from foldgpt.runtimes.onnx import check_onnx

    d, model = folded[kind]
    res = check_onnx(d, onnx_files[kind], n_windows=2, seq_len=24)  # 24 > the Gemma's sliding window of 16
    assert res["max_abs_diff"] < 1e-3, res
    assert abs(res["file_bytes"] - res["unique_param_bytes"]) <= 0.05 * res["unique_param_bytes"], res
    assert res["file_bytes"] < 0.8 * dense_param_bytes(model)  # the same model with its copies expanded
    assert res["rss_bytes"] > 0 and res["tokens_per_s"] > 0  # measured in a fresh process


@pytest.mark.parametrize("kind", list(KINDS))
def test_onnx_int8_stores_each_matrix_once_and_keeps_perplexity(folded, onnx_files, tmp_path, text_file, kind):
    """int8: the stored weights within 5% of the unique-parameter bytes at 1 byte per parameter (the tied embedding
    once, as the lookup's table that the LM head dequantizes), and the perplexity on text close to the fp32 model's.
    At int8 the graph itself (node and value names, ~90 kB) is 10% of these tiny models' file, so the file is held
    to the weights plus that; on SmolLM2 the file is within 5% (docs/runtimes.md)."""
    import onnx
    from onnx import numpy_helper

    from foldgpt.runtimes.onnx import check_onnx, quantize_onnx

    d, _ = folded[kind]
    q = quantize_onnx(onnx_files[kind], tmp_path / "int8.onnx")
    res = check_onnx(d, q, n_windows=2, seq_len=24, text=text_file.read_text())
    unique = res["unique_param_bytes_int8"]
    stored = sum(numpy_helper.to_array(i).nbytes for i in onnx.load(str(q)).graph.initializer)
    assert abs(stored - unique) <= 0.05 * unique and res["file_bytes"] < stored + 150_000, (stored, res)
    assert abs(res["ppl"] / res["ppl_reference"] - 1) < 0.05, res
    assert res["max_abs_diff"] < 0.5, res


def test_check_onnx_takes_windows_from_the_text_with_a_reference_model(folded, tmp_path, text_file, monkeypatch):
    """With `reference` (the bench passes the loaded model) the windows still come from `text`, tokenized with the
    folder's tokenizer, not from random ids."""
    pytest.importorskip("onnxruntime", reason="onnxruntime has no wheel for this platform")
    from foldgpt.models import load_tokenizer
    from foldgpt.runtimes import onnx, token_windows

    d, model = folded["llama"]
    text = text_file.read_text()
    seen = []

    def fake_session(path, windows, threads=None, prepack=True):  # the model's own logits: no onnxruntime run
        seen.append(windows)
        with torch.no_grad():
            return model(input_ids=windows).logits, {"rss_bytes": 1, "tokens_per_s": 1.0}

    monkeypatch.setattr(onnx, "measure_session", fake_session)
    (tmp_path / "m.onnx").write_bytes(b"x")
    res = onnx.check_onnx(d, tmp_path / "m.onnx", n_windows=2, seq_len=16, text=text, reference=model)
    expected = token_windows(320, 2, 16, 0, load_tokenizer(d)(text)["input_ids"])
    assert torch.equal(seen[0], expected)
    assert res["max_abs_diff"] < 1e-4 and res["ppl"] == pytest.approx(res["ppl_reference"], rel=1e-4), res


# ---- GGUF -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
def test_gguf_round_trip_through_transformers(folded, kind, tmp_path):
    pytest.importorskip("gguf", reason="the gguf package is not installed")
    from foldgpt.runtimes.gguf_export import check_gguf

    d, model = folded[kind]
    out = foldgpt.api.export(d, tmp_path / "m.gguf", "gguf", gguf_dtype="f32")
    res = check_gguf(d, out, n_windows=2, seq_len=24)
    assert res["max_abs_diff"] < 1e-4, res
    assert res["same_tokens"], res
    assert res["file_bytes"] >= 0.95 * dense_param_bytes(model)  # dense: a copy per position
    f16 = foldgpt.api.export(d, tmp_path / "h.gguf", "gguf")
    res16 = check_gguf(d, f16, n_windows=1, seq_len=24)
    assert res16["max_abs_diff"] < 0.05 and res16["file_bytes"] < 0.6 * res["file_bytes"], res16


def test_gguf_refuses_what_llama_cpp_cannot_run():
    from transformers import Gemma3TextConfig

    from foldgpt.runtimes.gguf_export import _sliding_period, check_architecture

    assert _sliding_period(["sliding_attention"] * 5 + ["full_attention"]) == 6
    assert _sliding_period(GEMMA_KINDS) == 2
    broken = ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]
    assert _sliding_period(broken) == 0
    cfg = Gemma3TextConfig(num_hidden_layers=4, layer_types=broken, head_dim=32, query_pre_attn_scalar=32)
    with pytest.raises(FoldGPTError, match="every p-th layer global"):
        check_architecture(cfg)
    cfg = Gemma3TextConfig(num_hidden_layers=2, head_dim=32, query_pre_attn_scalar=256)
    with pytest.raises(FoldGPTError, match="scales queries"):
        check_architecture(cfg)


# ---- CLI ----------------------------------------------------------------------------------------------------
def test_export_needs_exactly_one_format(folded, tmp_path):
    d, _ = folded["llama"]
    for argv in (["export", str(d)], ["export", str(d), "--onnx", "a.onnx", "--gguf", "a.gguf"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2


@pytest.mark.parametrize("flag, missing, extra", [("--onnx", "onnxscript", "onnx"), ("--gguf", "gguf", "gguf")])
def test_missing_runtime_is_one_line_and_writes_nothing(folded, tmp_path, capsys, monkeypatch, flag, missing, extra):
    d, _ = folded["llama"]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    out = tmp_path / ("m" + flag.replace("--", "."))
    assert main(["export", str(d), flag, str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("foldgpt: error:") and f"pip install 'foldgpt[{extra}]'" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_bad_export_input_is_one_line(folded, tmp_path, capsys):
    d, _ = folded["llama"]
    (tmp_path / "taken.gguf").write_text("x")
    for argv in (["export", str(d), "--gguf", str(tmp_path / "wrong.onnx")],
                 ["export", str(d), "--gguf", str(tmp_path / "taken.gguf")],
                 ["export", str(d), "--gguf", str(tmp_path / "m.gguf"), "--int8"],
                 ["export", str(tmp_path), "--onnx", str(tmp_path / "m.onnx")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("foldgpt: error:"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.gguf"]
    assert (tmp_path / "taken.gguf").read_text() == "x"


def test_dense_export_through_the_cli(folded, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    d, model = folded["llama"]
    assert main(["export", str(d), "--dense", str(tmp_path / "dense")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'dense'}"
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (dense(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item() < 1e-4
