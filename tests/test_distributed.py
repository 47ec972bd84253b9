"""Data-parallel cure: two CPU processes (gloo) follow the same loss curve as one process with the same
global batch."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from foldgpt.adapters import get_adapter
from foldgpt.config import CureConfig
from foldgpt.cure import cure
from foldgpt.data import calibration_batches, tokenize
from foldgpt.models import load_model
from foldgpt.plan import Plan
from foldgpt.structure import apply_plan_
from foldgpt.weights import clone_sharing_weights

CFG = dict(steps=4, batch_size=4, warmup=1, lr=5e-3)


def _run(model_dir: str, text: str) -> list[dict]:
    torch.manual_seed(0)
    dense, tok = load_model(model_dir)
    adapter = get_adapter(dense.config)
    student = clone_sharing_weights(dense)
    apply_plan_(student, Plan(6, "llama", removed=["4"], groups=[[1, 2]], adapter_rank=2), adapter)
    calib = calibration_batches(tokenize(tok, text), 16, 32, seed=0)
    return cure(student, dense, adapter, calib, CureConfig(**CFG))["history"]


def _worker(rank: int, world: int, port: int, model_dir: str, text: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        hist = _run(model_dir, text)
        if rank == 0:
            torch.save(hist, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_cure_matches_single_process(tiny_dirs, text_file, tmp_path):
    text = text_file.read_text()
    single = _run(str(tiny_dirs["llama"]), text)
    out = str(tmp_path / "hist.pt")
    mp.spawn(_worker, args=(2, _free_port(), str(tiny_dirs["llama"]), text, out), nprocs=2, join=True)
    double = torch.load(out)
    a = torch.tensor([[h["kl"], h["tail"]] for h in single])
    b = torch.tensor([[h["kl"], h["tail"]] for h in double])
    torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-5)
