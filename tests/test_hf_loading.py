"""The compressed folder is a first-class Hugging Face model: three load paths, dense export, KV cache."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import fast_config
from safetensors import safe_open

import foldgpt
from foldgpt.checkpoint.export import export_dense


@pytest.fixture(scope="module")
def folded(tiny_dirs, text_file, tmp_path_factory):
    out = {}
    for kind in ("llama", "gemma3"):
        d = tmp_path_factory.mktemp("folded") / kind
        res = foldgpt.compress(str(tiny_dirs[kind]), [str(text_file)], d, fast_config(target_params=0.7))
        assert res.plan.groups and res.plan.removed
        out[kind] = (d, res.model)
    return out


IDS = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(3))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_auto_class_after_import(folded, kind):
    from transformers import AutoModelForCausalLM

    d, mem = folded[kind]
    model = AutoModelForCausalLM.from_pretrained(d)
    assert (logits(model) - logits(mem)).abs().max().item() <= 1e-5
    assert json.loads((d / "config.json").read_text())["model_type"] == "foldgpt"


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_foldgpt_load(folded, kind):
    d, mem = folded[kind]
    model, tok = foldgpt.load(d)
    assert (logits(model) - logits(mem)).abs().max().item() <= 1e-5
    assert tok is not None


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_trust_remote_code_without_foldgpt(folded, kind, tmp_path):
    d, mem = folded[kind]
    torch.save(IDS, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["foldgpt"] = None  # foldgpt is not importable in this process
        try:
            import foldgpt  # noqa
            raise SystemExit("foldgpt should not be importable")
        except ImportError:
            pass
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(d)!r}, trust_remote_code=True)
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        with torch.no_grad():
            torch.save(m(input_ids=ids).logits, {str(tmp_path / 'out.pt')!r})
        assert not any(k.startswith("foldgpt") for k in sys.modules if sys.modules[k] is not None)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (torch.load(tmp_path / "out.pt") - logits(mem)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_dense_export_loads_without_remote_code(folded, kind, tmp_path):
    from transformers import AutoModelForCausalLM

    d, mem = folded[kind]
    out = export_dense(d, tmp_path / "dense")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] != "foldgpt" and "auto_map" not in cfg
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == len(mem.model.layers)
    assert (logits(model) - logits(mem)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_saved_tensors_share_no_storage_and_load_allocates_once(folded, kind):
    d, mem = folded[kind]
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any(".base." in k for k in keys)  # children's shared Linears are not stored
    model, _ = foldgpt.load(d)
    ptrs = [p.data_ptr() for p in model.parameters()]  # parameters() lists shared tensors once
    assert len(ptrs) == len(set(ptrs))
    total = sum(p.numel() for p in model.parameters())
    assert total == foldgpt.api.unique_params(mem)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_generate_with_cache_matches_without(folded, kind):
    d, _ = folded[kind]
    model, _ = foldgpt.load(d)
    prompt = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    with torch.no_grad():
        a = model.generate(input_ids=prompt, max_new_tokens=24, do_sample=False, use_cache=True, pad_token_id=2)
        b = model.generate(input_ids=prompt, max_new_tokens=24, do_sample=False, use_cache=False, pad_token_id=2)
    assert torch.equal(a, b)
    assert a.shape[1] > prompt.shape[1]


def test_info_and_generate_cli(folded):
    import json as _json

    from test_errors import run_cli

    d, mem = folded["llama"]
    proc = run_cli("info", d, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = _json.loads(proc.stdout)
    assert info["positions"] == len(mem.model.layers) and info["layers_before"] == 6
    assert info["removed"] and info["groups"] and info["unique_params"] == foldgpt.api.unique_params(mem)
    proc = run_cli("generate", d, "It is a truth", "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()
    proc = run_cli("info", d.parent)
    assert proc.returncode == 2 and "foldgpt: error:" in proc.stderr
