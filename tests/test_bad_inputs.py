"""Every bad input, as a hostile user would try it, against compress, eval, info, generate and export on tiny Llama and
Gemma-3 models: exit code 2, exactly one `foldgpt: error:` line that names the problem and what to do, no traceback,
and nothing left on disk (no output, no `.OUT.tmp-*`, no temporary folder).

The CLI runs in-process (foldgpt.cli.main); each case's inputs are made fresh by the MAKERS named in its arguments."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

FAST = ["--seq-len", "32", "--calib-seqs", "16", "--gate-steps", "2", "--cure-steps", "1"]
# words by which an error line says what to do
ADVICE = re.compile(r";|\bmust\b|\bgive\b|\buse\b|\bchoose\b|\bpass\b|\blower\b|\braise\b|\bname\b|\bfix\b|"
                    r"\binstall\b|\bdrop\b|\bconvert\b|\bcopy\b|\brestore\b|\blaunch\b")


# ---- the tiny models the cases run against ---------------------------------------------------------------
def _save_folded(src: Path, out: Path, plan) -> Path:
    from foldgpt.adapters import get_adapter
    from foldgpt.checkpoint.folded import base_config_dict, save_folded
    from foldgpt.models import load_model
    from foldgpt.stages.structure import apply_plan_

    model, tok = load_model(str(src))
    adapter = get_adapter(model.config)
    apply_plan_(model, plan, adapter)
    out.mkdir()
    save_folded(model, tok, plan, out, base_config_dict(model, plan.num_layers, plan.layer_kinds))
    plan.save(out / "plan.json")
    (out / "summary.json").write_text(json.dumps({"unique_params": 1, "base_params": 2}))
    return out


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> dict[str, Path]:
    """Tiny random models (no training: the cases only need them to load), two folded checkpoints, a text."""
    from tinymodels import sample_text, save_tiny, tiny_config, tiny_model

    from foldgpt.plan import Plan

    root = tmp_path_factory.mktemp("bad_inputs")
    llama = save_tiny(root / "llama", "llama", model=tiny_model("llama", layers=4, train_steps=0))
    gemma = save_tiny(root / "gemma", "gemma3", model=tiny_model("gemma3", layers=6, train_steps=0))
    kinds = list(tiny_config("gemma3", 6).layer_types)
    folded = _save_folded(llama, root / "folded", Plan(4, "llama", removed=["3", "2.attn"], groups=[[0, 1]],
                                                       adapter_rank=2, child_gates={"1": 0.5},
                                                       layer_kinds=["full_attention"] * 4))
    folded_gemma = _save_folded(gemma, root / "folded_gemma", Plan(6, "gemma3_text", removed=["4"],
                                                                   groups=[[0, 1]], adapter_rank=2,
                                                                   layer_kinds=kinds))
    text = root / "calib.txt"
    text.write_text(sample_text(8000, seed=1))
    systmp = root / "systmp"
    systmp.mkdir()
    return {"root": root, "llama": llama, "gemma": gemma, "folded": folded, "folded_gemma": folded_gemma,
            "text": text, "systmp": systmp}


# ---- makers: each writes one bad input into the case's folder and returns its path ---------------------------
def _copy(src: Path, d: Path, name: str = "model") -> Path:
    return Path(shutil.copytree(src, d / name))


def _edit_config(folder: Path, fn) -> Path:
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _llama_with(fn):
    return lambda d, fx: _edit_config(_copy(fx["llama"], d), fn)


def _layout(fn, which: str = "folded"):
    return lambda d, fx: _edit_config(_copy(fx[which], d), lambda c: fn(c["fold_layout"]))


def _weights(fn, which: str = "llama"):
    def make(d, fx):
        m = _copy(fx[which], d)
        w = m / "model.safetensors"
        w.write_bytes(fn(w.read_bytes()))
        return m

    return make


def _without(names: tuple[str, ...], which: str = "llama"):
    def make(d, fx):
        m = _copy(fx[which], d)
        for n in names:
            (m / n).unlink()
        return m

    return make


def _file(name: str, data: bytes | str):
    def make(d, fx):
        p = d / name
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        return p

    return make


def _plan(fn, which: str = "folded"):
    """A copy of a folded fixture's plan.json, edited by fn."""
    def make(d, fx):
        plan = json.loads((fx[which] / "plan.json").read_text())
        plan = fn(plan) or plan
        p = d / "plan.json"
        p.write_text(json.dumps(plan))
        return p

    return make


def _set(**kw):
    return lambda d: d.update(kw)


RANDOM = bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist())
NOT_JSON = b"{not json at all}"
LATIN1 = ("Il était une fois une forêt où l'on mangeait des crêpes. " * 200).encode("latin-1")


def _only_pickle(d, fx):
    m = _without(("model.safetensors",))(d, fx)
    (m / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle (never loaded)
    return m


def _sharded_missing(d, fx):
    m = _copy(fx["llama"], d)
    (m / "model.safetensors").rename(m / "model-00001-of-00002.safetensors")
    from foldgpt.checks import check_safetensors

    names = check_safetensors(m / "model-00001-of-00002.safetensors")
    wmap = {k: ("model-00002-of-00002.safetensors" if i % 2 else "model-00001-of-00002.safetensors")
            for i, k in enumerate(k for k in names if k != "__metadata__")}
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    return m


def _dir_with(files: dict[str, bytes]):
    def make(d, fx):
        p = d / "texts"
        p.mkdir()
        for n, b in files.items():
            (p / n).write_bytes(b)
        return p

    return make


def _out_under_file(d, fx):
    (d / "afile").write_text("x")
    return d / "afile" / "out"


def _existing_out(d, fx):
    (d / "existing").mkdir()
    (d / "existing" / "keep.txt").write_text("x")
    return d / "existing"


def _readonly_parent(d, fx):
    p = d / "ro"
    p.mkdir()
    p.chmod(0o555)
    return p / "out"


def _holds_text(d, fx):
    p = d / "corpus"
    p.mkdir()
    shutil.copy(fx["text"], p / "calib.txt")
    return p


def _task(d, fx):
    p = d / "task.jsonl"
    p.write_text('{"context": "It is a truth", "choices": [" universally", " dog"], "answer": 0}\n')
    return p


MAKERS = {
    # model folders
    "empty_dir": lambda d, fx: (d / "empty").mkdir() or d / "empty",
    "cfg_badjson": lambda d, fx: (_copy(fx["llama"], d) / "config.json").write_text("{nope") and d / "model",
    "cfg_list": lambda d, fx: (_copy(fx["llama"], d) / "config.json").write_text("[1, 2]") and d / "model",
    "cfg_no_type": _llama_with(lambda c: c.pop("model_type")),
    "cfg_unknown_type": _llama_with(_set(model_type="nosucharch")),
    "cfg_bert": lambda d, fx: (d / "bert").mkdir() or (d / "bert" / "config.json").write_text(
        json.dumps({"model_type": "bert", "hidden_size": 8})) and d / "bert",
    "cfg_neg_layers": _llama_with(_set(num_hidden_layers=-2)),
    "cfg_latin1": lambda d, fx: (_copy(fx["llama"], d) / "config.json").write_bytes(
        b'{"model_type": "llama", "name": "caf\xe9"}') and d / "model",
    "st_truncated": _weights(lambda b: b[: len(b) // 2]),
    "st_random": _weights(lambda b: RANDOM),
    "st_empty": _weights(lambda b: b""),
    "st_badheader": _weights(lambda b: (len(NOT_JSON)).to_bytes(8, "little") + NOT_JSON),
    "st_header_list": _weights(lambda b: (2).to_bytes(8, "little") + b"[]"),
    "only_pickle": _only_pickle,
    "no_weights": _without(("model.safetensors",)),
    "no_tokenizer": _without(("tokenizer.json", "tokenizer_config.json")),
    "bad_tokenizer": lambda d, fx: (_copy(fx["llama"], d) / "tokenizer.json").write_text("{broken") and d / "model",
    "shard_missing": _sharded_missing,
    "gguf_random": _file("model.gguf", RANDOM[1:]),
    "gguf_empty": _file("model.gguf", b""),
    "gguf_magic_garbage": _file("model.gguf", b"GGUF" + (3).to_bytes(4, "little") + RANDOM),
    "gguf_magic_version": _file("model.gguf", b"GGUF" + (77).to_bytes(4, "little") + RANDOM),
    "gguf_magic_only": _file("model.gguf", b"GGUF"),
    # texts
    "text_empty": _file("empty.txt", b""),
    "text_blank": _file("blank.txt", "  \n\n \t\n"),
    "text_short": _file("short.txt", "It is a truth universally acknowledged."),
    "latin1_jsonl": _file("latin1.jsonl", b'{"text": "' + LATIN1 + b'"}\n'),
    "latin1_txt": _file("latin1.txt", LATIN1),
    "random_txt": _file("random.txt", RANDOM),
    "utf16_txt": _file("utf16.txt", ("It is a truth universally acknowledged. " * 100).encode("utf-16")),
    "control_txt": _file("control.txt", "\x01\x02\x03\x04 abc \x05\x06\x07" * 300),
    "jsonl_bad_line": _file("bad.jsonl", '{"text": "a"}\n{"text": \n'),
    "jsonl_no_text": _file("notext.jsonl", '{"body": "a"}\n'),
    "jsonl_text_int": _file("int.jsonl", '{"text": 5}\n'),
    "jsonl_list_row": _file("list.jsonl", '["a", "b"]\n'),
    "jsonl_deep": _file("deep.jsonl", "[" * 100000 + "]" * 100000 + "\n"),
    "dir_no_text": _dir_with({"a.csv": b"x,y\n"}),
    "dir_latin1": _dir_with({"a.txt": b"fine text " * 100, "b.txt": LATIN1}),
    # outputs
    "out_file": _file("outfile", "a file"),
    "out_under_file": _out_under_file,
    "existing_out": _existing_out,
    "readonly_parent": _readonly_parent,
    "holds_text": _holds_text,
    "json_folder": lambda d, fx: (d / "res").mkdir() or d / "res",
    # plans
    "plan_badjson": _file("plan.json", "{\"num_layers\": 4,"),
    "plan_empty": _file("plan.json", ""),
    "plan_list": _file("plan.json", "[1, 2, 3]"),
    "plan_string": _file("plan.json", '"a plan"'),
    "plan_utf16": _file("plan.json", '{"num_layers": 4}'.encode("utf-16")),
    "plan_dir": lambda d, fx: (d / "plandir").mkdir() or d / "plandir",
    "plan_class": _plan(lambda p: p.update(shared_linears=["__class__"])),
    "plan_r99": _plan(lambda p: p.update(removed=["99"])),
    "plan_rneg": _plan(lambda p: p.update(removed=["-1"])),
    "plan_rfoo": _plan(lambda p: p.update(removed=["1.foo"])),
    "plan_rint": _plan(lambda p: p.update(removed=[3])),
    "plan_rdup": _plan(lambda p: p.update(removed=["3", "3"])),
    "plan_rboth": _plan(lambda p: p.update(removed=["3", "3.attn"])),
    "plan_rzero": _plan(lambda p: p.update(removed=["03"])),
    "plan_init": _plan(lambda p: p.update(adapter_init="banana")),
    "plan_nl_str": _plan(lambda p: p.update(num_layers="4")),
    "plan_nl_missing": _plan(lambda p: p.pop("num_layers") and None),
    "plan_nl_zero": _plan(lambda p: p.update(num_layers=0)),
    "plan_type_gemma": _plan(lambda p: None, "folded_gemma"),
    "plan_type_bert": _plan(lambda p: p.update(model_type="bert")),
    "plan_layers6": _plan(lambda p: p.update(num_layers=6, layer_kinds=["full_attention"] * 6)),
    "plan_group_range": _plan(lambda p: p.update(groups=[[0, 99]])),
    "plan_group_order": _plan(lambda p: p.update(groups=[[1, 0, 0]])),
    "plan_group_removed": _plan(lambda p: p.update(groups=[[0, 3]], child_gates={})),
    "plan_group_str": _plan(lambda p: p.update(groups="0,1")),
    "plan_gate_nonchild": _plan(lambda p: p.update(child_gates={"2": 0.5})),
    "plan_gate_str": _plan(lambda p: p.update(child_gates={"1": "half"})),
    "plan_gate_key": _plan(lambda p: p.update(child_gates={"one": 0.5})),
    "plan_mode_bad": _plan(lambda p: p.update(child_modes={"1": {"mlp.up_proj": "borrowed"}})),
    "plan_mode_name": _plan(lambda p: p.update(child_modes={"1": {"mlp.__init__": "own"}})),
    "plan_rank_neg": _plan(lambda p: p.update(child_ranks={"1": -4})),
    "plan_compensation": _plan(lambda p: p.update(compensation="magic")),
    "plan_version": _plan(lambda p: p.update(version=99)),
    "plan_all_removed": _plan(lambda p: p.update(removed=["0", "1", "2", "3"], groups=[], child_gates={})),
    "plan_merge_range": _plan(lambda p: p.update(merges=[[2, 3, 9]])),
    "plan_unknown_key": _plan(lambda p: p.update(remove=["3"])),
    "plan_kinds_len": _plan(lambda p: p.update(layer_kinds=["full_attention"])),
    "plan_posgates_str": _plan(lambda p: p.update(position_gates="yes")),
    "plan_rank_str": _plan(lambda p: p.update(adapter_rank="8")),
    "plan_provenance_list": _plan(lambda p: p.update(provenance=[1])),
    "plan_mix_kinds": _plan(lambda p: p.update(groups=[[0, 2]]), "folded_gemma"),
    "plan_sub_group": _plan(lambda p: p.update(removed=["4", "1.mlp"]), "folded_gemma"),
    # folded checkpoints with a damaged layout or folder
    "lay_missing_layer": _layout(lambda c: c.update(kept=[0, 1, 7])),
    "lay_missing_parent": _layout(lambda c: c["parents"].update({"1": 5})),
    "lay_parent_self": _layout(lambda c: c["parents"].update({"1": 1})),
    "lay_parent_key": _layout(lambda c: c.update(parents={"x": 0})),
    "lay_kept_order": _layout(lambda c: c.update(kept=[1, 0, 2])),
    "lay_kept_empty": _layout(lambda c: c.update(kept=[])),
    "lay_class": _layout(lambda c: c.update(shared_linears=["__class__"])),
    "lay_branch": _layout(lambda c: c.update(attn_branch="__class__")),
    "lay_sub_part": _layout(lambda c: c["removed_sublayers"].update({"2": ["foo"]})),
    "lay_sub_pos": _layout(lambda c: c["removed_sublayers"].update({"9": ["attn"]})),
    "lay_gate_pos": _layout(lambda c: c.update(child_gates=[7])),
    "lay_own_rank0": _layout(lambda c: c.update(adapter_rank=0, child_modes={"1": {"mlp.up_proj": "own"}})),
    "lay_num_layers": _layout(lambda c: c.update(num_layers=9)),
    "lay_not_dict": lambda d, fx: _edit_config(_copy(fx["folded"], d), _set(fold_layout=[1, 2])),
    "lay_missing": lambda d, fx: _edit_config(_copy(fx["folded"], d), lambda c: c.pop("fold_layout")),
    "lay_base_type": lambda d, fx: _edit_config(_copy(fx["folded"], d),
                                                lambda c: c["base_config"].update(model_type="bert")),
    "lay_plan_rfoo": lambda d, fx: _edit_config(_copy(fx["folded"], d),
                                                lambda c: c["fold_plan"].update(removed=["1.foo"])),
    "lay_rank_changed": _layout(lambda c: c.update(adapter_rank=3)),
    "lay_gemma_missing_layer": _layout(lambda c: c.update(kept=[0, 1, 2, 3, 8]), "folded_gemma"),
    "lay_gemma_missing_parent": _layout(lambda c: c["parents"].update({"1": 6}), "folded_gemma"),
    "folded_cfg_badjson": lambda d, fx: (_copy(fx["folded"], d) / "config.json").write_text("{") and d / "model",
    "folded_no_weights": _without(("model.safetensors",), "folded"),
    "folded_truncated": _weights(lambda b: b[: len(b) - 100], "folded"),
    "folded_no_tokenizer": _without(("tokenizer.json", "tokenizer_config.json"), "folded"),
    "folded_summary_bad": lambda d, fx: (_copy(fx["folded"], d) / "summary.json").write_text("{") and d / "model",
    "folded_plan_list": lambda d, fx: (_copy(fx["folded"], d) / "plan.json").write_text("[]") and d / "model",
    "task_latin1": _file("task.jsonl", b'{"context": "caf\xe9", "choices": ["a", "b"], "answer": 0}\n'),
    "task_bad": _file("task.jsonl", '{"context": "a", "choices": [], "answer": 0}\n'),
    "task": _task,
}


# (id, argv, what the error line must contain); {name}: a fixture path or a MAKERS input; {out}: an output path
# the run must not create; {tmp}: the case's folder.
LLAMA = ["compress", "{llama}", "--text", "{text}", "--out", "{out}", *FAST]
GEMMA = ["compress", "{gemma}", "--text", "{text}", "--out", "{out}", *FAST]
EVAL = ["eval", "{llama}", "--text", "{text}", "--seq-len", "32"]


def model(m):
    return ["compress", m, "--text", "{text}", "--out", "{out}", *FAST]


def text(t):
    return ["compress", "{llama}", "--text", t, "--out", "{out}", *FAST]


CASES = [
    # ---- compress: the model argument
    ("model-missing", model("{tmp}/no_model"), "not found"),
    ("model-folder-without-config", model("{empty_dir}"), "no config.json"),
    ("model-config-bad-json", model("{cfg_badjson}"), "not valid JSON"),
    ("model-config-a-list", model("{cfg_list}"), "not an object"),
    ("model-config-latin1", model("{cfg_latin1}"), "not UTF-8"),
    ("model-config-no-model-type", model("{cfg_no_type}"), "no model_type"),
    ("model-type-unknown-to-transformers", model("{cfg_unknown_type}"), "'nosucharch', which transformers"),
    ("model-type-unsupported", model("{cfg_bert}"), "unsupported model type 'bert'"),
    ("model-negative-layers", model("{cfg_neg_layers}"), "num_hidden_layers"),
    ("safetensors-truncated", model("{st_truncated}"), "truncated"),
    ("safetensors-random", model("{st_random}"), "not a readable safetensors"),
    ("safetensors-empty", model("{st_empty}"), "not a readable safetensors"),
    ("safetensors-header-not-json", model("{st_badheader}"), "header is not valid JSON"),
    ("safetensors-header-a-list", model("{st_header_list}"), "header is a JSON list"),
    ("only-pickle-weights", model("{only_pickle}"), "only pickle weights"),
    ("no-weights", model("{no_weights}"), "has no weights"),
    ("no-tokenizer", model("{no_tokenizer}"), "has no tokenizer"),
    ("broken-tokenizer", model("{bad_tokenizer}"), "cannot read the tokenizer"),
    ("shard-missing", model("{shard_missing}"), "which is missing"),
    ("gguf-missing", model("{tmp}/nope.gguf"), "GGUF file not found"),
    ("gguf-random", model("{gguf_random}"), "not a GGUF file"),
    ("gguf-empty", model("{gguf_empty}"), "not a GGUF file"),
    ("gguf-magic-then-garbage", model("{gguf_magic_garbage}"), "damaged GGUF"),
    ("gguf-magic-bad-version", model("{gguf_magic_version}"), "version 77"),
    ("gguf-magic-only", model("{gguf_magic_only}"), "damaged or unsupported GGUF"),
    ("model-already-folded", model("{folded}"), "already a folded foldgpt checkpoint"),
    ("model-is-a-text-file", model("{text}"), "not a Hugging Face model folder"),
    ("gemma-no-tokenizer", model("{gemma_no_tokenizer}"), "has no tokenizer"),
    # ---- compress: the text
    ("text-missing", text("{tmp}/nope.txt"), "text not found"),
    ("text-empty", text("{text_empty}"), "is empty"),
    ("text-blank", text("{text_blank}"), "is empty"),
    ("text-shorter-than-a-window", text("{text_short}"), "fewer than one window"),
    ("text-latin1-jsonl", text("{latin1_jsonl}"), "not UTF-8"),
    ("text-latin1-txt", text("{latin1_txt}"), "not UTF-8"),
    ("text-random-bytes", text("{random_txt}"), "looks binary"),
    ("text-utf16", text("{utf16_txt}"), "looks binary"),
    ("text-control-characters", text("{control_txt}"), "looks binary"),
    ("text-jsonl-bad-line", text("{jsonl_bad_line}"), ":2 is not valid JSON"),
    ("text-jsonl-no-text", text("{jsonl_no_text}"), "no string field 'text'"),
    ("text-jsonl-text-not-string", text("{jsonl_text_int}"), "no string field 'text'"),
    ("text-jsonl-row-a-list", text("{jsonl_list_row}"), "no string field 'text'"),
    ("text-jsonl-deep-nesting", text("{jsonl_deep}"), "is not valid JSON"),
    ("text-dir-without-text", text("{dir_no_text}"), "contains no .txt or .jsonl"),
    ("text-dir-with-latin1", text("{dir_latin1}"), "not UTF-8"),
    ("gemma-text-latin1", ["compress", "{gemma}", "--text", "{latin1_jsonl}", "--out", "{out}"], "not UTF-8"),
    # ---- compress: settings
    *[(f"target-{v}", [*LLAMA, "--target-params", v], "--target-params") for v in ("1.5", "0", "-0.2", "nan", "inf")],
    ("target-not-a-number", [*LLAMA, "--target-params", "abc"], "invalid float value: 'abc'"),
    ("remove-rate-0.99", [*LLAMA, "--remove-rate", "0.99"], "--remove-rate 0.99 removes 4 of the model's 4"),
    ("gemma-remove-rate-0.95", [*GEMMA, "--remove-rate", "0.95"], "--remove-rate 0.95 removes 6 of the model's 6"),
    *[(f"remove-rate-{v}", [*LLAMA, "--remove-rate", v], "--remove-rate must be in [0, 1)")
      for v in ("1.0", "-0.1", "nan")],
    ("remove-share-1.5", [*LLAMA, "--remove-share", "1.5"], "remove share"),
    *[(f"cure-lr-{v}", [*LLAMA, "--cure-lr", v], "--cure-lr must be a finite number > 0")
      for v in ("nan", "inf", "-1", "0")],
    ("micro-batch-negative", [*LLAMA, "--micro-batch", "-1"], "--micro-batch must be >= 0"),
    ("seq-len-4", [*LLAMA, "--seq-len", "4"], "--seq-len must be >= 8"),
    ("seq-len-negative", [*LLAMA, "--seq-len", "-1"], "--seq-len must be >= 8"),
    ("seq-len-beyond-context", [*LLAMA, "--seq-len", "4096"], "longer than the model's context (256"),
    ("gemma-seq-len-beyond-context", [*GEMMA, "--seq-len", "300"], "longer than the model's context (256"),
    ("seq-len-not-int", [*LLAMA, "--seq-len", "abc"], "invalid int value: 'abc'"),
    ("calib-seqs-0", [*LLAMA, "--calib-seqs", "0"], "calibration sequences"),
    ("group-size-0", [*LLAMA, "--group-size", "0"], "group size"),
    ("adapter-rank-negative", [*LLAMA, "--adapter-rank", "-1"], "adapter rank"),
    ("cure-steps-negative", [*LLAMA, "--cure-steps", "-1"], "cure steps"),
    ("gate-steps-0", [*LLAMA, "--gate-steps", "0"], "gate steps"),
    ("gate-rounds-0", [*LLAMA, "--gate-rounds", "0"], "gate rounds"),
    ("tail-layers-negative", [*LLAMA, "--tail-layers", "-1"], "tail layers"),
    ("child-lr-scale-negative", [*LLAMA, "--child-lr-scale", "-1"], "child learning-rate scale"),
    ("child-lr-scale-nan", [*LLAMA, "--child-lr-scale", "nan"], "child learning-rate scale"),
    ("general-share-1", [*LLAMA, "--general-share", "1.0"], "--general-share"),
    ("general-share-nan", [*LLAMA, "--general-share", "nan"], "--general-share"),
    ("teacher-topk-0", [*LLAMA, "--teacher-topk", "0"], "--teacher-topk"),
    ("cure-lora-rank-negative", [*LLAMA, "--cure-lora-rank", "-1"], "LoRA rank"),
    ("per-step-0", [*LLAMA, "--per-step", "0"], "--per-step"),
    ("confirm-negative", [*LLAMA, "--confirm", "-1"], "--confirm"),
    ("child-fractions-1.5", [*LLAMA, "--child-fractions", "1.5"], "child fractions"),
    ("child-fractions-text", [*LLAMA, "--child-fractions", "abc"], "comma-separated numbers"),
    ("actions-unknown", [*LLAMA, "--actions", "foo"], "search actions"),
    ("method-unknown", [*LLAMA, "--method", "nosuch"], "unknown method 'nosuch'"),
    ("ranking-unknown", [*LLAMA, "--ranking", "nosuch"], "invalid choice: 'nosuch'"),
    ("precision-unknown", [*LLAMA, "--precision", "fp8"], "invalid choice: 'fp8'"),
    ("device-unknown", [*LLAMA, "--device", "bogus"], "--device 'bogus' is not a device"),
    ("device-gpu-absent", [*LLAMA, "--device", "cuda:99"], "GPU"),
    ("max-memory-without-device-map", [*LLAMA, "--max-memory", "cpu=1GiB"], "--max-memory needs --device-map auto"),
    ("streaming-with-device-map", [*LLAMA, "--streaming", "--device-map", "offload"], "--streaming and --device-map"),
    ("streaming-with-a-cure", [*LLAMA, "--streaming"], "--streaming runs"),
    ("fsdp-without-torchrun", [*LLAMA, "--fsdp"], "--fsdp shards the cure"),
    ("cure-and-no-cure", [*LLAMA, "--cure", "--no-cure"], "not allowed with argument"),
    ("unknown-option", [*LLAMA, "--nope"], "unrecognized arguments: --nope"),
    ("out-missing", ["compress", "{llama}", "--text", "{text}"], "required: --out"),
    # ---- compress: the output location
    ("out-exists", ["compress", "{llama}", "--text", "{text}", "--out", "{existing_out}", *FAST], "already exists"),
    ("out-is-a-file", ["compress", "{llama}", "--text", "{text}", "--out", "{out_file}", *FAST], "is a file"),
    ("out-is-a-file-overwrite", ["compress", "{llama}", "--text", "{text}", "--out", "{out_file}", "--overwrite",
                                 *FAST], "is a file"),
    ("out-under-a-file", ["compress", "{llama}", "--text", "{text}", "--out", "{out_under_file}", *FAST],
     "is a file"),
    ("out-dot", ["compress", "{llama}", "--text", "{text}", "--out", ".", "--overwrite", *FAST], "current folder"),
    ("out-dot-dot", ["compress", "{llama}", "--text", "{text}", "--out", "..", "--overwrite", *FAST],
     "current folder"),
    ("out-empty", ["compress", "{llama}", "--text", "{text}", "--out", "", *FAST], "current folder"),
    ("out-is-the-model", ["compress", "{gemma_copy}", "--text", "{text}", "--out", "{gemma_copy}", "--overwrite",
                          *FAST], "the input"),
    ("out-holds-the-text", ["compress", "{llama}", "--text", "{holds_text}", "--out", "{holds_text}", "--overwrite",
                            *FAST], "the input"),
    ("out-impossible", ["compress", "{llama}", "--text", "{text}", "--out", "/proc/foldgpt-out", *FAST],
     "cannot write"),
    ("out-read-only-parent", ["compress", "{llama}", "--text", "{text}", "--out", "{readonly_parent}", *FAST],
     "cannot write"),
    # ---- compress: the plan
    ("plan-missing", [*LLAMA, "--plan", "{tmp}/nope.json"], "plan file not found"),
    ("plan-a-folder", [*LLAMA, "--plan", "{plan_dir}"], "is a folder, not a file"),
    ("plan-bad-json", [*LLAMA, "--plan", "{plan_badjson}"], "is not valid JSON"),
    ("plan-empty-file", [*LLAMA, "--plan", "{plan_empty}"], "is not valid JSON"),
    ("plan-utf16", [*LLAMA, "--plan", "{plan_utf16}"], "not UTF-8"),
    ("plan-json-list", [*LLAMA, "--plan", "{plan_list}"], "holds a JSON list"),
    ("plan-json-string", [*LLAMA, "--plan", "{plan_string}"], "holds a JSON string"),
    ("plan-shared-linears-class", [*LLAMA, "--plan", "{plan_class}"], "'__class__', not a Linear"),
    ("plan-removed-99", [*LLAMA, "--plan", "{plan_r99}"], "'99', but the model has 4 layers"),
    ("plan-removed-minus-1", [*LLAMA, "--plan", "{plan_rneg}"], "removed[0] is '-1'"),
    ("plan-removed-1.foo", [*LLAMA, "--plan", "{plan_rfoo}"], "removed[0] is '1.foo'"),
    ("plan-removed-an-int", [*LLAMA, "--plan", "{plan_rint}"], "removed[0] is 3"),
    ("plan-removed-twice", [*LLAMA, "--plan", "{plan_rdup}"], "twice"),
    ("plan-removed-layer-and-sub-block", [*LLAMA, "--plan", "{plan_rboth}"], "whole and also"),
    ("plan-removed-leading-zero", [*LLAMA, "--plan", "{plan_rzero}"], "removed[0] is '03'"),
    ("plan-adapter-init", [*LLAMA, "--plan", "{plan_init}"], "adapter_init must be one of"),
    ("plan-num-layers-string", [*LLAMA, "--plan", "{plan_nl_str}"], "num_layers must be an integer"),
    ("plan-num-layers-missing", [*LLAMA, "--plan", "{plan_nl_missing}"], "num_layers is missing"),
    ("plan-num-layers-0", [*LLAMA, "--plan", "{plan_nl_zero}"], "num_layers is 0"),
    ("plan-for-gemma-on-llama", [*LLAMA, "--plan", "{plan_type_gemma}"], "6 layers, this one has 4"),
    ("plan-model-type-unsupported", [*LLAMA, "--plan", "{plan_type_bert}"], "foldgpt does not support"),
    ("plan-layer-count", [*LLAMA, "--plan", "{plan_layers6}"], "6 layers, this one has 4"),
    ("plan-group-out-of-range", [*LLAMA, "--plan", "{plan_group_range}"], "groups[0][1] is 99"),
    ("plan-group-order", [*LLAMA, "--plan", "{plan_group_order}"], "must list a parent"),
    ("plan-group-removed-layer", [*LLAMA, "--plan", "{plan_group_removed}"], "removed or already grouped"),
    ("plan-groups-a-string", [*LLAMA, "--plan", "{plan_group_str}"], "groups must be a list"),
    ("plan-child-gate-not-a-child", [*LLAMA, "--plan", "{plan_gate_nonchild}"], "not a folded child"),
    ("plan-child-gate-string", [*LLAMA, "--plan", "{plan_gate_str}"], "must be a finite number"),
    ("plan-child-gate-key", [*LLAMA, "--plan", "{plan_gate_key}"], "not a layer index"),
    ("plan-child-mode", [*LLAMA, "--plan", "{plan_mode_bad}"], "must be one of 'shared', 'alpha', 'own'"),
    ("plan-child-mode-name", [*LLAMA, "--plan", "{plan_mode_name}"], "'mlp.__init__', not a shared Linear"),
    ("plan-child-rank-negative", [*LLAMA, "--plan", "{plan_rank_neg}"], "child_ranks[1] is -4"),
    ("plan-compensation", [*LLAMA, "--plan", "{plan_compensation}"], "compensation must be one of"),
    ("plan-version-too-new", [*LLAMA, "--plan", "{plan_version}"], "newer than this foldgpt"),
    ("plan-removes-every-layer", [*LLAMA, "--plan", "{plan_all_removed}"], "removes every layer"),
    ("plan-merge-out-of-range", [*LLAMA, "--plan", "{plan_merge_range}"], "merges[0][2] is 9"),
    ("plan-unknown-field", [*LLAMA, "--plan", "{plan_unknown_key}"], "'remove' are unknown"),
    ("plan-layer-kinds-length", [*LLAMA, "--plan", "{plan_kinds_len}"], "layer_kinds has 1 entries"),
    ("plan-position-gates-string", [*LLAMA, "--plan", "{plan_posgates_str}"], "must be true or false"),
    ("plan-adapter-rank-string", [*LLAMA, "--plan", "{plan_rank_str}"], "adapter_rank must be an integer"),
    ("plan-provenance-list", [*LLAMA, "--plan", "{plan_provenance_list}"], "provenance must be an object"),
    ("gemma-plan-mixes-kinds", [*GEMMA, "--plan", "{plan_mix_kinds}"], "mixes attention kinds"),
    ("gemma-plan-sub-block-child", [*GEMMA, "--plan", "{plan_sub_group}"], "lost a sub-block"),
    ("gemma-plan-for-llama", [*GEMMA, "--plan", "{plan_layers6}"], "made for a llama model"),
    # ---- eval
    *[(f"eval-seq-len-{v}", [*EVAL, "--seq-len", v], "--seq-len must be >= 2") for v in ("0", "1", "-3")],
    *[(f"eval-batch-size-{v}", [*EVAL, "--batch-size", v], "--batch-size must be >= 1") for v in ("0", "-1")],
    *[(f"eval-max-tokens-{v}", [*EVAL, "--max-tokens", v], "--max-tokens must be >= 1") for v in ("-5", "0")],
    ("eval-json-a-folder", [*EVAL, "--json", "{json_folder}"], "is a folder"),
    ("eval-json-under-a-file", [*EVAL, "--json", "{out_under_file}"], "is a file"),
    ("eval-json-impossible", [*EVAL, "--json", "/proc/foldgpt.json"], "cannot write"),
    ("eval-no-text", ["eval", "{llama}"], "give evaluation text"),
    ("eval-cloze-without-text", ["eval", "{llama}", "--tasks", "{task}", "--cloze", "3"], "--cloze builds"),
    ("eval-cloze-negative", [*EVAL, "--cloze", "-1"], "--cloze must be >= 0"),
    ("eval-task-limit-0", [*EVAL, "--task-limit", "0"], "--task-limit must be >= 1"),
    ("eval-task-missing", [*EVAL, "--tasks", "{tmp}/nope.jsonl"], "not found"),
    ("eval-task-latin1", [*EVAL, "--tasks", "{task_latin1}"], "not UTF-8"),
    ("eval-task-malformed", [*EVAL, "--tasks", "{task_bad}"], "'choices' must be a non-empty list"),
    ("eval-model-missing", ["eval", "{tmp}/none", "--text", "{text}"], "not found"),
    ("eval-second-model-broken", ["eval", "{llama}", "{lay_missing_layer}", "--text", "{text}", "--seq-len", "32"],
     "fold_layout.kept[2] is 7"),
    ("eval-layout-missing-layer", ["eval", "{lay_missing_layer}", "--text", "{text}"], "fold_layout.kept[2] is 7"),
    ("eval-layout-missing-parent", ["eval", "{lay_missing_parent}", "--text", "{text}"], "parents[1] is 5"),
    ("eval-gemma-layout-missing-layer", ["eval", "{lay_gemma_missing_layer}", "--text", "{text}"],
     "fold_layout.kept[4] is 8"),
    ("eval-layout-weights-mismatch", ["eval", "{lay_rank_changed}", "--text", "{text}", "--seq-len", "32"],
     "the weights do not match config.json"),
    ("eval-text-latin1", ["eval", "{llama}", "--text", "{latin1_txt}"], "not UTF-8"),
    ("eval-text-random", ["eval", "{llama}", "--text", "{random_txt}"], "looks binary"),
    ("eval-text-shorter-than-a-window", ["eval", "{llama}", "--text", "{text_short}", "--seq-len", "128"],
     "fewer than one window"),
    ("eval-device-unknown", [*EVAL, "--device", "bogus"], "not a device"),
    ("eval-folded-no-tokenizer", ["eval", "{folded_no_tokenizer}", "--text", "{text}", "--seq-len", "32"],
     "has no tokenizer"),
    ("eval-no-weights", ["eval", "{no_weights}", "--text", "{text}"], "has no weights"),
    ("eval-truncated-weights", ["eval", "{st_truncated}", "--text", "{text}"], "truncated"),
    ("eval-gguf-garbage", ["eval", "{gguf_magic_garbage}", "--text", "{text}"], "damaged GGUF"),
    ("eval-seq-len-not-int", [*EVAL, "--seq-len", "x"], "invalid int value"),
    ("eval-no-model", ["eval", "--text", "{text}"], "required: models"),
    # ---- info
    ("info-missing", ["info", "{tmp}/none"], "is not a folder"),
    ("info-a-file", ["info", "{text}"], "is not a folder"),
    ("info-dense-model", ["info", "{llama}"], "is not a foldgpt folder"),
    ("info-no-config", ["info", "{empty_dir}"], "model config not found"),
    ("info-config-bad-json", ["info", "{folded_cfg_badjson}"], "not valid JSON"),
    ("info-no-weights", ["info", "{folded_no_weights}"], "has no model.safetensors"),
    ("info-truncated-weights", ["info", "{folded_truncated}"], "truncated"),
    ("info-layout-missing-layer", ["info", "{lay_missing_layer}"], "fold_layout.kept[2] is 7"),
    ("info-layout-missing-parent", ["info", "{lay_missing_parent}"], "parents[1] is 5"),
    ("info-layout-parent-itself", ["info", "{lay_parent_self}"], "the child itself"),
    ("info-layout-parent-key", ["info", "{lay_parent_key}"], "not a layer index"),
    ("info-layout-kept-order", ["info", "{lay_kept_order}"], "increasing order"),
    ("info-layout-kept-empty", ["info", "{lay_kept_empty}"], "is empty"),
    ("info-layout-class", ["info", "{lay_class}"], "'__class__', not a Linear"),
    ("info-layout-branch", ["info", "{lay_branch}"], "attn_branch is '__class__'"),
    ("info-layout-sub-block", ["info", "{lay_sub_part}"], "list 'attn' and/or 'mlp'"),
    ("info-layout-sub-block-position", ["info", "{lay_sub_pos}"], "names layer 9"),
    ("info-layout-gate-position", ["info", "{lay_gate_pos}"], "child_gates[0] is 7"),
    ("info-layout-own-rank-0", ["info", "{lay_own_rank0}"], "needs a rank > 0"),
    ("info-layout-num-layers", ["info", "{lay_num_layers}"], "num_layers is 9"),
    ("info-layout-not-an-object", ["info", "{lay_not_dict}"], "fold_layout must be an object"),
    ("info-layout-missing", ["info", "{lay_missing}"], "has no fold_layout"),
    ("info-base-type", ["info", "{lay_base_type}"], "base_config.model_type is 'bert'"),
    ("info-fold-plan-removed-1.foo", ["info", "{lay_plan_rfoo}"], "fold_plan is not a valid foldgpt plan"),
    ("info-summary-bad-json", ["info", "{folded_summary_bad}"], "summary.json is not valid JSON"),
    ("info-plan-json-a-list", ["info", "{folded_plan_list}"], "holds a JSON list"),
    ("info-gemma-layout-missing-parent", ["info", "{lay_gemma_missing_parent}"], "parents[1] is 6"),
    # ---- generate
    ("generate-missing", ["generate", "{tmp}/none", "hi"], "not found"),
    ("generate-layout-missing-layer", ["generate", "{lay_missing_layer}", "hi"], "fold_layout.kept[2] is 7"),
    ("generate-layout-missing-parent", ["generate", "{lay_missing_parent}", "hi"], "parents[1] is 5"),
    ("generate-gemma-layout-missing-layer", ["generate", "{lay_gemma_missing_layer}", "hi"], "kept[4] is 8"),
    ("generate-max-new-tokens-negative", ["generate", "{folded}", "hi", "--max-new-tokens", "-5"],
     "--max-new-tokens must be >= 1"),
    ("generate-max-new-tokens-0", ["generate", "{folded}", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    ("generate-temperature-0", ["generate", "{folded}", "hi", "--sample", "--temperature", "0"], "--temperature"),
    ("generate-temperature-nan", ["generate", "{folded}", "hi", "--sample", "--temperature", "nan"],
     "--temperature"),
    ("generate-no-tokenizer", ["generate", "{folded_no_tokenizer}", "hi"], "has no tokenizer"),
    ("generate-truncated-weights", ["generate", "{folded_truncated}", "hi"], "truncated"),
    ("generate-weights-mismatch", ["generate", "{lay_rank_changed}", "hi"], "the weights do not match"),
    ("generate-own-rank-0", ["generate", "{lay_own_rank0}", "hi"], "needs a rank > 0"),
    ("generate-no-prompt", ["generate", "{folded}"], "required: prompt"),
    # ---- export
    ("export-layout-missing-layer", ["export", "{lay_missing_layer}", "--dense", "{out}"], "kept[2] is 7"),
    ("export-layout-missing-parent", ["export", "{lay_missing_parent}", "--dense", "{out}"], "parents[1] is 5"),
    ("export-gemma-layout-missing-parent", ["export", "{lay_gemma_missing_parent}", "--dense", "{out}"],
     "parents[1] is 6"),
    ("export-dense-exists", ["export", "{folded}", "--dense", "{existing_out}"], "already exists"),
    ("export-dense-is-the-source", ["export", "{folded_copy}", "--dense", "{folded_copy}", "--overwrite"],
     "the input"),
    ("export-dense-under-a-file", ["export", "{folded}", "--dense", "{out_under_file}"], "which is a file"),
    ("export-dense-dot", ["export", "{folded}", "--dense", ".", "--overwrite"], "current folder"),
    ("export-not-folded", ["export", "{llama}", "--dense", "{out}"], "is not a foldgpt folder"),
    ("export-missing", ["export", "{tmp}/none", "--dense", "{out}"], "is not a folder"),
    ("export-truncated", ["export", "{folded_truncated}", "--dense", "{out}"], "truncated"),
    ("export-no-format", ["export", "{folded}"], "one of the arguments --dense --onnx --gguf --executorch is required"),
    # ---- the command line itself
    ("no-command", [], "required: cmd"),
    ("unknown-command", ["shrink", "{llama}"], "invalid choice: 'shrink'"),
]

MAKERS.update({
    "gemma_no_tokenizer": _without(("tokenizer.json", "tokenizer_config.json"), "gemma"),
    "gemma_copy": lambda d, fx: _copy(fx["gemma"], d),
    "folded_copy": lambda d, fx: _copy(fx["folded"], d, "folded"),
})


def _expand(argv: list[str], case_dir: Path, fx: dict[str, Path]) -> list[str]:
    made: dict[str, Path] = {}

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name == "tmp":
            return str(case_dir)
        if name == "out":
            return str(case_dir / "out")
        if name in fx:
            return str(fx[name])
        if name not in made:
            made[name] = MAKERS[name](case_dir, fx)
        return str(made[name])

    return [re.sub(r"\{(\w+)\}", sub, a) for a in argv]


def _tree(*roots: Path) -> set[str]:
    return {str(p) for r in roots for p in r.rglob("*")}


def run_main(argv: list[str]) -> tuple[int, str]:
    """foldgpt.cli.main in this process: (exit code, stderr)."""
    from foldgpt.cli import main

    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


def assert_one_line_error(code, stderr: str, expect: str) -> str:
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("foldgpt: error:")]
    assert len(lines) == 1, stderr[-2000:]
    assert "foldgpt: error:" not in stderr.replace(lines[0], ""), stderr[-2000:]
    assert expect in lines[0], lines[0]
    assert ADVICE.search(lines[0].split("error:", 1)[1]), f"no advice in: {lines[0]}"
    return lines[0]


@pytest.mark.parametrize("argv, expect", [pytest.param(a, e, id=i) for i, a, e in CASES])
def test_bad_input(argv, expect, fx, tmp_path, monkeypatch):
    if "{readonly_parent}" in argv and os.geteuid() == 0:
        pytest.skip("permissions do not bind root")
    if any(a.startswith("/proc/") for a in argv) and not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    args = _expand(argv, case_dir, fx)
    monkeypatch.chdir(case_dir)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(fx["systmp"]))  # the system temp folder, watched
    before = _tree(case_dir, fx["root"])
    code, stderr = run_main(args)
    assert_one_line_error(code, stderr, expect)
    assert not (case_dir / "out").exists()
    assert _tree(case_dir, fx["root"]) == before, "files left behind or inputs touched"


def test_table_covers_every_command():
    commands = {argv[0] for _, argv, _ in CASES if argv}
    assert {"compress", "eval", "info", "generate", "export"} <= commands
    assert len(CASES) >= 130
    assert len({i for i, _, _ in CASES}) == len(CASES)


def test_the_fixtures_themselves_work(fx, tmp_path, monkeypatch):
    """The cases' fixtures are sound: the same commands with good inputs succeed (else a broken fixture would make
    every case above pass for the wrong reason)."""
    monkeypatch.chdir(tmp_path)
    for folded in ("folded", "folded_gemma"):
        assert run_main(["info", str(fx[folded])])[0] == 0
        assert run_main(["generate", str(fx[folded]), "hi", "--max-new-tokens", "2"])[0] == 0
        assert run_main(["export", str(fx[folded]), "--dense", str(tmp_path / f"{folded}-dense")])[0] == 0
    assert run_main(["eval", str(fx["llama"]), str(fx["folded"]), "--text", str(fx["text"]), "--seq-len", "32",
                     "--json", str(tmp_path / "r.json")])[0] == 0
    code, stderr = run_main(["compress", str(fx["llama"]), "--text", str(fx["text"]), "--out", str(tmp_path / "c"),
                             "--plan", str(fx["folded"] / "plan.json"), "--no-cure", *FAST])
    assert code == 0, stderr[-2000:]


def test_alias_missing_a_part_package_is_one_line(tmp_path, monkeypatch):
    """A model alias whose GGUF is assembled from part packages, with a part missing: one error line naming the
    install command, and no partial file left in the cache."""
    import sys

    from foldgpt import models
    from foldgpt.errors import FoldGPTError

    pkg = tmp_path / "site" / "fake_parted_model"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("def assemble(out):\n    open(out, 'wb').write(b'x')\n"
                                     "    import fake_parted_model_part9  # noqa: F401\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("FOLDGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(models.ALIASES, "fake-model", models.Alias("fake_parted_model", "fake.gguf",
                                                                   "pip install fake-parted-model"))
    with pytest.raises(FoldGPTError, match="fake_parted_model_part9.*pip install fake-parted-model"):
        models._alias_gguf("fake-model")
    assert not list((tmp_path / "cache").rglob("*.partial")) and not list((tmp_path / "cache").rglob("*.gguf"))
    sys.modules.pop("fake_parted_model", None)
