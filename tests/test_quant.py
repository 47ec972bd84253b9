"""Weight-only quantization (foldgpt.quant) and byte budgets (foldgpt.size, --target-size) on tiny Llama and Gemma-3
models: a quantized folded model saves to safetensors with each shared matrix once, loads back exactly, runs close to
the float model, and runs under `foldgpt eval` / `generate`; --target-size parses strictly, refuses a budget below
the embeddings in one line, and lands under the budget."""

import json
import os

import pytest
import torch
from helpers import GEMMA_KINDS, fast_config, wide_config
from tinymodels import make_tokenizer

import foldgpt
from foldgpt import Plan
from foldgpt.cli import main
from foldgpt.errors import FoldGPTError

pytest.importorskip("torchao", reason="torchao (foldgpt[quant]) is not installed")

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]
LAYERS = 4
# model type, layer kinds, groups: the first group's first child runs alpha * its parent's matrices + B A, the last
# child runs its parent's attention in full (+ B A) and its own low-rank MLP (B A only)
KINDS = {
    "llama": ("llama", [], [[1, 2, 3]]),
    "gemma3": ("gemma3_text", GEMMA_KINDS, [[0, 2], [1, 3]]),
}
# ||logits - float logits|| / ||float logits|| (random tiny weights: no outliers, errors add up over layers)
TOLERANCE = {"int8": 0.03, "int4": 0.3}



@pytest.fixture(scope="module")
def folded(tmp_path_factory, text_file):
    """Per family: the dense folder and a folded one (no cure) with alpha, shared and own children."""
    from transformers import AutoModelForCausalLM

    out = {}
    for kind, (model_type, kinds, groups) in KINDS.items():
        root = tmp_path_factory.mktemp(f"q-{kind}")
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(wide_config(kind), dtype=torch.float32)
        base.save_pretrained(root / "base")
        make_tokenizer().save_pretrained(root / "base")
        alpha_child, last_child = groups[0][1], groups[-1][-1]
        modes = {str(alpha_child): {lin: "alpha" for lin in LINEARS},
                 str(last_child): {lin: "own" if lin.startswith("mlp") else "shared" for lin in LINEARS}}
        plan = Plan(num_layers=LAYERS, model_type=model_type, groups=groups, layer_kinds=kinds, adapter_rank=2,
                    adapter_init="svd", child_modes=modes)
        foldgpt.compress(str(root / "base"), [str(text_file)], root / "folded", fast_config(cure=False), plan=plan)
        out[kind] = root
    return out


@pytest.fixture(scope="module")
def quantized(folded):
    """Per family and level: the folder quant.quantize_folder wrote from the folded one."""
    from foldgpt.quant import quantize_folder

    return {(kind, level): quantize_folder(str(root / "folded"), root / f"folded-{level}", level)
            for kind, root in folded.items() for level in ("int8", "int4")}


def _error_line(capsys) -> str:
    """The one `foldgpt: error:` line of a command (progress bars aside), with no traceback."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("foldgpt: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def _logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _expected_bytes(model, level: str) -> int:
    """The tensor bytes of the float folded model's unique tensors at `level` (quant.scheme_bytes)."""
    from foldgpt.quant import _entries, scheme_bytes, scheme_for

    quantized = {}
    for e in _entries(model):
        quantized[id(e.param)] = scheme_bytes(scheme_for(level, tuple(e.param.shape), e.embedding),
                                              tuple(e.param.shape))
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += quantized.get(id(p), p.numel() * 4)
    return total


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("level", ["int8", "int4"])
def test_quantized_folder_saves_shared_matrices_once_and_loads_exactly(folded, quantized, kind, level):
    from foldgpt.checkpoint.modeling_foldgpt import SharedLinear, load_folded_model
    from foldgpt.quant import is_quantized, resident_bytes

    ref, _ = foldgpt.load(folded[kind] / "folded")
    qdir = quantized[(kind, level)]
    config = json.loads((qdir / "config.json").read_text())
    assert config["quantization"]["level"] == level
    # each shared matrix once: the file is the unique tensors at this precision (+ the header), far below a copy per
    # position, and every quantized tensor is stored as plain int8/uint8 values with its scales
    size = os.path.getsize(qdir / "model.safetensors")
    expected = _expected_bytes(ref, level)
    assert expected <= size <= 1.05 * expected
    assert size < 0.4 * os.path.getsize(folded[kind] / "folded" / "model.safetensors")
    model, tok = foldgpt.load(qdir)
    assert tok is not None
    views = [m for m in model.modules() if isinstance(m, SharedLinear)]
    assert views and all(is_quantized(v.base.weight) for v in views)
    parents = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert all(id(v.base.weight) in parents for v in views)  # a child runs its parent's (quantized) Linear
    assert all(is_quantized(v.lora_A) and is_quantized(v.lora_B) for v in views if v.rank)
    if kind == "llama":  # tied: the LM head is the embedding's quantized tensor
        assert model.lm_head.weight is model.model.embed_tokens.weight and is_quantized(model.lm_head.weight)
    assert resident_bytes(model) < 0.5 * resident_bytes(ref)
    # close to the float model, within what the level allows; the saved model back exactly
    out, want = _logits(model), _logits(ref)
    assert (out - want).norm() <= TOLERANCE[level] * want.norm(), ((out - want).norm() / want.norm()).item()
    again, _ = foldgpt.load(qdir)
    assert torch.equal(_logits(again), out)
    # the bundled runtime (trust_remote_code, no torchao) loads the same folder dequantized
    plain = load_folded_model(str(qdir))
    assert torch.allclose(_logits(plain), out, atol=1e-4)


def test_quantized_folder_runs_under_eval_and_generate(quantized, eval_file, capsys):
    qdir = quantized[("llama", "int4")]
    assert main(["eval", str(qdir), "--text", str(eval_file), "--seq-len", "32", "--max-tokens", "64"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["generate", str(qdir), "the quick", "--max-new-tokens", "4", "--no-chat"]) == 0
    assert main(["export", str(qdir), "--dense", str(qdir.parent / "dense-out")]) == 2
    assert "quantized" in _error_line(capsys) and not (qdir.parent / "dense-out").exists()


def test_dense_model_quantizes_into_a_folder_that_keeps_every_layer(folded):
    from foldgpt.quant import quantize_folder

    root = folded["gemma3"]
    qdir = quantize_folder(str(root / "base"), root / "dense-int8", "int8")
    model, _ = foldgpt.load(qdir)
    base, _ = foldgpt.load(root / "base")
    want = _logits(base)
    assert (_logits(model) - want).norm() <= TOLERANCE["int8"] * want.norm()
    assert json.loads((qdir / "config.json").read_text())["fold_layout"]["kept"] == list(range(LAYERS))


# ---- --target-size ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["100", "10XB", "-5MB", "0MB", "1e3MB", "5 M B", "nan MB", "MB"])
def test_target_size_parse_errors_are_one_line(tmp_path, text_file, capsys, size):
    out = tmp_path / "o"
    code = main(["compress", "x", "--text", str(text_file), "--out", str(out), f"--target-size={size}"])
    assert code == 2 and _error_line(capsys).startswith("foldgpt: error: --target-size")
    assert not out.exists()


def test_target_size_parses_units():
    from foldgpt.size import parse_size

    assert parse_size("60MB") == 60 * 10**6
    assert parse_size("0.5GB") == 5 * 10**8
    assert parse_size("100MiB") == 100 * 2**20
    assert parse_size("12 kB") == 12000


@pytest.mark.parametrize("extra", [["--target-params", "0.5"], ["--quantize", "int8"], ["--remove-rate", "0.2"]])
def test_target_size_excludes_other_targets(tmp_path, text_file, capsys, folded, extra):
    out = tmp_path / "o"
    code = main(["compress", str(folded["llama"] / "base"), "--text", str(text_file), "--out", str(out),
                 "--target-size", "1MB", *extra])
    assert code == 2 and "--target-size" in _error_line(capsys)
    assert not out.exists()


def test_budget_below_the_embeddings_is_one_line_and_leaves_nothing(tmp_path, text_file, capsys, folded):
    out = tmp_path / "o"
    code = main(["compress", str(folded["llama"] / "base"), "--text", str(text_file), "--out", str(out),
                 "--target-size", "20kB", "--seq-len", "32", "--calib-seqs", "8"])
    assert code == 2 and "embeddings alone" in _error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == []


def test_target_size_lands_under_the_budget(tmp_path, text_file, folded):
    """The wide tiny Llama is 9.2 MB in fp32, 2.3 MB at int8 and 1.3 MB at int4: 1 MB needs int4 and folding; 1.8 MB
    fits the whole model at int4 with int8 for some matrices in the spare bytes; 2.5 MB fits it at int8 (nothing
    folded, no cure)."""
    from foldgpt.size import parse_size

    base = folded["llama"] / "base"
    for size, level, whole in (("1MB", "int4", False), ("1.8MB", "int4", True), ("2.5MB", "int8", True)):
        cfg = fast_config(target_params=None, target_size=size)
        res = foldgpt.compress(str(base), [str(text_file)], tmp_path / size, cfg)
        weights = os.path.getsize(tmp_path / size / "model.safetensors")
        assert weights <= parse_size(size)
        assert res.summary["size"]["weights_bytes"] == weights and res.summary["size"]["within_budget"]
        assert res.summary["target_size"]["level"] == level == res.summary["quantization"]["level"]
        assert res.plan.provenance["target_size"]["level"] == level
        assert (res.summary["params_ratio"] == 1.0) == whole and (not res.plan.groups and not res.plan.removed) == whole
        assert "weights on disk (MB)" in res.table
        upgraded = res.summary["quantization"].get("int8_matrices", [])
        assert (size != "2.5MB" or not upgraded) and (size != "1.8MB" or upgraded)  # int8 upgrades: int4 only
        bits = json.loads((tmp_path / size / "config.json").read_text())["quantization"]["tensors"]
        assert all(bits[n]["bits"] == 8 for n in upgraded)
        model, _ = foldgpt.load(tmp_path / size)
        assert torch.isfinite(_logits(model)).all()


def test_quantize_level_rejects_unknown(tmp_path, text_file, capsys):
    with pytest.raises(SystemExit) as exc:  # argparse's choices, in the project's one-line form (cli_parser.Parser)
        main(["compress", "x", "--text", str(text_file), "--out", str(tmp_path / "o"), "--quantize", "int3"])
    assert exc.value.code == 2 and "--quantize" in _error_line(capsys)
    with pytest.raises(FoldGPTError, match="--quantize"):
        foldgpt.CompressConfig(quantize="fp8")


def test_bench_takes_byte_budgets(folded, text_file, eval_file, tmp_path):
    """`foldgpt bench --target-size`: each row chooses its target and level; the table shows the level and bytes."""
    from foldgpt.bench import bench
    from foldgpt.config import EvalConfig
    from foldgpt.size import parse_size

    rows = bench(str(folded["llama"] / "base"), ["shortgpt"], ["1MB"], [str(text_file)], [str(eval_file)],
                 tmp_path / "b", base=fast_config(), evaluation=EvalConfig(seq_len=32, max_tokens=64))
    assert [(r["method"], r["target"]) for r in rows] == [("dense", 1.0), ("shortgpt", "1MB")]
    assert rows[1]["quantization"] == "int4" and rows[1]["weights_bytes"] <= parse_size("1MB")
    assert rows[0]["weights_bytes"] > rows[1]["weights_bytes"]
    table = (tmp_path / "b" / "results.md").read_text()
    assert "| shortgpt | 1MB |" in table and "int4" in table


def test_int8_upgrades_measure_each_kind_and_leave_the_model_as_it_was(folded):
    """size.int8_upgrades quantizes one kind of matrix at a time (a child's B factor without its A too) and puts the
    float weights back; what it picks fits the spare bytes."""
    from foldgpt.quant import _entries, scheme_bytes, scheme_for
    from foldgpt.size import int8_upgrades

    model, _ = foldgpt.load(folded["llama"] / "folded")
    want = _logits(model)
    held = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    names, rises = int8_upgrades(model, held, 60_000)
    assert any(k.endswith("lora_B") for k in rises) and any(k.endswith("lora_A") for k in rises)
    assert torch.equal(_logits(model), want)
    shapes = {e.name: tuple(e.param.shape) for e in _entries(model)}
    cost = sum(scheme_bytes(scheme_for("int8", shapes[n], False), shapes[n])
               - scheme_bytes(scheme_for("int4", shapes[n], False), shapes[n]) for n in names)
    assert names and cost <= 60_000
