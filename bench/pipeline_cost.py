"""Run the whole foldgpt pipeline on a random model of a real shape and report each stage's wall time,
tokens/s and peak memory (resident memory on CPU, allocated memory on GPU).

    python bench/pipeline_cost.py --shape llama2-7b --device cuda --dtype bf16     # one lent GPU
    python bench/pipeline_cost.py --shape smollm2-135m --device cpu --dtype fp32    # this machine
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


class PeakRSS:
    """Samples the process's resident memory in a thread (CPU peak)."""

    def __init__(self):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, False

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.05)

    def __exit__(self, *a):
        self._stop = True
        self.t.join()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="smollm2-135m")
    p.add_argument("--layers", type=int, default=None, help="override the depth (scaling fits)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib-seqs", type=int, default=64)
    p.add_argument("--gate-steps", type=int, default=5)
    p.add_argument("--cure-steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-checkpointing", action="store_true", help="in gate training and the cure")
    p.add_argument("--micro-batch", type=int, default=0, help="in gate training and the cure")
    p.add_argument("--teacher-cache", action="store_true", help="cure from the on-disk top-k teacher cache")
    p.add_argument("--device-map", choices=["auto", "offload"], default=None,
                   help="place the layers (offload: on the CPU, copied to --device as they run)")
    p.add_argument("--method", default="foldgpt", help="any foldgpt method (a peer is cured too)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    # random weights give tiny activations deep in the stack: without this, denormal floats make the CPU
    # many times slower than on real weights and the measurement would be about denormals, not the model
    torch.set_flush_denormal(True)
    from shapes import byte_tokenizer, random_model

    from foldgpt.adapters import get_adapter
    from foldgpt.config import CompressConfig, CureConfig, GateConfig
    from foldgpt.data import Corpus, builtin_text, calibration_batches, tokenize
    from foldgpt.pipeline import Session, run_method
    from foldgpt.scale.placement import apply as place
    from foldgpt.scale.placement import plan as plan_placement
    from foldgpt.stages.analysis import analysis_dict, similarity

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    gpu = a.device.startswith("cuda")
    over = {"num_hidden_layers": a.layers} if a.layers else {}
    t0 = time.perf_counter()
    with PeakRSS() as mem_load:
        model = random_model(a.shape, dtype, "cpu" if a.device_map else a.device, **over)
        if a.device_map:
            place(model, get_adapter(model.config), plan_placement(model, get_adapter(model.config), a.device_map,
                                                                   a.device))
    load_s = time.perf_counter() - t0
    tok = byte_tokenizer()
    text = builtin_text()
    ids = tokenize(tok, text)
    calib = calibration_batches(ids, a.calib_seqs, a.seq_len, 0, tok.bos_token_id)
    adapter = get_adapter(model.config)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with PeakRSS() as mem_an:
        sim = similarity(model, adapter, calib[:16], skip_first=True)
    an_s = time.perf_counter() - t0
    an_gpu = torch.cuda.max_memory_allocated() if gpu else None
    session = Session(a.shape, model, tok, adapter, True, calib, sim, analysis_dict(sim), Corpus(text, ["python-docs"]))
    cfg = CompressConfig(method=a.method, target_params=0.75, seq_len=a.seq_len, calib_seqs=a.calib_seqs,
                         device=a.device, device_map=a.device_map,
                         gate=GateConfig(steps=a.gate_steps, rounds=min(5, a.gate_steps), batch_size=a.batch_size,
                                         micro_batch=a.micro_batch, grad_checkpointing=a.grad_checkpointing),
                         cure=CureConfig(enabled=True, steps=a.cure_steps, batch_size=a.batch_size, warmup=1,
                                         micro_batch=a.micro_batch, grad_checkpointing=a.grad_checkpointing,
                                         teacher_cache=a.teacher_cache))
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as mem_run:
        run = run_method(session, cfg)
    sec = run.summary["seconds"]
    tokens = a.batch_size * a.seq_len
    stages = {
        "load": {"seconds": load_s, "peak_rss": mem_load.peak},
        "analyze": {"seconds": an_s, "tokens_per_s": 16 * a.seq_len / an_s, "peak_rss": mem_an.peak,
                    "peak_gpu": an_gpu},
        "plan (gates + fold costs)": {"seconds": sec.get("Planning"), "gate_steps": a.gate_steps,
                                      "tokens_per_s": a.gate_steps * tokens / max(sec.get("Planning", 1), 1e-9)},
        "cure": {"seconds": sec.get("Curing"), "tokens_per_s": a.cure_steps * tokens / max(sec.get("Curing", 1), 1e-9)},
        "measure": {"seconds": sec.get("Measuring")},
    }
    out = {"shape": a.shape, "layers": model.config.num_hidden_layers, "method": a.method,
           "device": a.device, "device_map": a.device_map, "placement": run.summary.get("placement"),
           "dtype": a.dtype, "params": sum(p.numel() for p in model.parameters()),
           "weight_bytes": weight_bytes, "stages": stages, "peak_rss_run": mem_run.peak,
           "peak_gpu_run": torch.cuda.max_memory_allocated() if gpu else None,
           "unique_params_after": run.summary["unique_params"], "removed": run.plan.removed, "groups": run.plan.groups}
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
