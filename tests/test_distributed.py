"""Data-parallel cure: two CPU processes (gloo) follow the same loss curve as one process with the same
global batch."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from foldgpt.adapters import get_adapter
from foldgpt.config import CureConfig
from foldgpt.data import calibration_batches, tokenize
from foldgpt.models import load_model
from foldgpt.plan import Plan
from foldgpt.stages.cure import cure
from foldgpt.stages.structure import apply_plan_
from foldgpt.stages.weights import clone_sharing_weights

# fp32: these runs must agree to float rounding; under bf16 autocast (what "auto" resolves to on a CPU with bf16
# instructions) an fp32 sum in another order can flip a weight's bf16 rounding in the next step
CFG = dict(steps=4, batch_size=4, warmup=1, lr=5e-3, precision="fp32")


def _run(model_dir: str, text: str, fsdp: bool = False) -> dict:
    torch.manual_seed(0)
    dense, tok = load_model(model_dir)
    adapter = get_adapter(dense.config)
    student = clone_sharing_weights(dense)
    apply_plan_(student, Plan(6, "llama", removed=["4"], groups=[[1, 2]], adapter_rank=2), adapter)
    calib = calibration_batches(tokenize(tok, text), 16, 32, seed=0)
    info = cure(student, dense, adapter, calib, CureConfig(**CFG, fsdp=fsdp))
    ids = calib[:2]
    info["logits_after"] = student(ids).logits.detach()  # the merged result, plain tensors again
    info["plain_weights"] = all(type(p) is torch.nn.Parameter for p in student.parameters())
    return info


def _worker(rank: int, world: int, port: int, model_dir: str, text: str, out: str, fsdp: bool = False) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        info = _run(model_dir, text, fsdp)
        if rank == 0:
            torch.save(info, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_cure_matches_single_process(tiny_dirs, text_file, tmp_path):
    text = text_file.read_text()
    single = _run(str(tiny_dirs["llama"]), text)["history"]
    out = str(tmp_path / "hist.pt")
    mp.spawn(_worker, args=(2, _free_port(), str(tiny_dirs["llama"]), text, out), nprocs=2, join=True)
    double = torch.load(out)["history"]
    a = torch.tensor([[h["kl"], h["tail"]] for h in single])
    b = torch.tensor([[h["kl"], h["tail"]] for h in double])
    torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-5)


def test_two_process_fsdp_cure_matches_the_data_parallel_one(tiny_dirs, text_file, tmp_path):
    """--fsdp: each unique Linear (the parent's, which its child borrows) is sharded once over two processes;
    the loss curve and the merged model equal the two-process data-parallel cure's (which follows the
    one-process curve, above)."""
    text = text_file.read_text()
    runs = {}
    for fsdp in (False, True):
        out = str(tmp_path / f"fsdp{fsdp}.pt")
        mp.spawn(_worker, args=(2, _free_port(), str(tiny_dirs["llama"]), text, out, fsdp), nprocs=2, join=True)
        runs[fsdp] = torch.load(out)
    ddp, got = runs[False], runs[True]
    a = torch.tensor([[h["kl"], h["tail"]] for h in ddp["history"]])
    b = torch.tensor([[h["kl"], h["tail"]] for h in got["history"]])
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["logits_after"], ddp["logits_after"], rtol=1e-4, atol=1e-4)
    assert got["plain_weights"]
    f = got["fsdp"]
    assert f["world"] == 2 and f["params_local"] * 2 == f["params_full"]  # half of every shared matrix


def test_fsdp_needs_several_processes(tiny_dirs, text_file):
    import pytest

    from foldgpt.errors import FoldGPTError

    with pytest.raises(FoldGPTError, match="torchrun"):
        _run(str(tiny_dirs["llama"]), text_file.read_text(), fsdp=True)


def test_compress_under_torchrun_with_fsdp(tiny_dirs, text_file, tmp_path):
    """`torchrun --nproc-per-node 2 -m foldgpt.cli compress ... --fsdp --device-map offload` on the CPU (gloo):
    one output folder,
    written by rank 0, whose summary says the cure ran sharded over two processes; without torchrun, --fsdp
    is a one-line error."""
    import json
    import subprocess
    import sys

    from test_errors import FAST, assert_clean_error, run_cli

    out = tmp_path / "o"
    args = ["compress", str(tiny_dirs["llama"]), "--text", str(text_file), "--out", str(out), "--target-params",
            "0.6", "--fsdp", "--device-map", "offload", *FAST[:-1], "3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(_free_port()), "-m", "foldgpt.cli", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distributed"]["world"] == 2
    fsdp = summary["distributed"]["fsdp"]
    assert fsdp["params_local"] * 2 == fsdp["params_full"]
    assert set(summary["placement"]["layers"]) == {"offload"}  # with the layers offloaded too
    assert_clean_error(run_cli(*[a if a != str(out) else tmp_path / "p" for a in args]), tmp_path / "p", "torchrun")
