"""Typed, validated configuration for every stage. The CLI fills these; library code never sees argparse."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import FoldGPTError


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise FoldGPTError(msg)


@dataclass
class GateConfig:
    # "layer", "sublayer" (attention and MLP separately) or "auto": the greedy ranking runs both searches and keeps
    # sub-blocks only when they reach the target at a clearly lower calibration NLL (methods/foldgpt.py:
    # AUTO_SUBLAYER_RISE), else whole layers; the gates ranking takes whole layers
    unit: str = "auto"
    steps: int = 40
    rounds: int = 5  # removal happens over this many rounds of gate training
    batch_size: int = 4
    budget: str = "project"  # "project" (hard budget, scale-free steps) or "penalty" (Adam + penalty)
    lr: float = 0.15
    momentum: float = 0.5
    lambda_pol: float = 1.0
    pol_t: float = 1.0
    lambda_budget: float = 20.0
    anneal: float = 0.6  # fraction of steps over which the budget tightens from 1 to its target
    micro_batch: int = 0  # >0: split each batch into micro-batches and accumulate the gate gradient
    grad_checkpointing: bool = False  # recompute activations in the backward pass (less memory)

    def __post_init__(self):
        _check(self.unit in ("auto", "layer", "sublayer"),
               f"gate unit must be 'auto', 'layer' or 'sublayer', got '{self.unit}'")
        _check(self.steps >= 1, "gate steps must be >= 1")
        _check(self.budget in ("project", "penalty"), "gate budget must be 'project' or 'penalty'")

    @property
    def fixed_unit(self) -> str:
        """The unit a single ranking uses: "auto" is whole layers wherever no search comparison decides."""
        return "layer" if self.unit == "auto" else self.unit


@dataclass
class FoldConfig:
    group_size: int = 2
    adapter_rank: int = 8
    adapter_init: str = "zero"
    shared_linears: list[str] = field(default_factory=list)  # empty: every Linear of the block
    select: str = "loss"  # how to choose the groups: "loss" (calibration KL when folded) or "adjacent"
    position_gates: bool = False
    child_gates: bool = True  # a scalar gate on each child's branches, initialised by measured calibration NLL
    cost_batch: int = 2
    # a child may also borrow the nearest kept layer of another attention kind (Gemma-3: a sliding-window child on a
    # global layer's weights, same shapes); the measured child search decides whether it helps
    across_kinds: bool = False
    # --ranking search (methods/search.py): fitted children at these costs (fractions of a block's parameters)
    child_fractions: list[float] = field(default_factory=lambda: [0.125, 0.25])
    rescore: int = 6  # after the first step, re-score only this many best actions (<= 0: every action, every step)
    # how the search scores actions: "nll" (through the vocabulary head) or "topk" (the teacher's top-k tokens + the
    # target: 2x cheaper on SmolLM2, more where the head is large; bench/search_agreement.py)
    score: str = "topk"
    topk: int = 64
    search_windows: int = 2  # calibration windows the search scores on
    confirm: int = 0  # > 0: the best few of each step are scored again with the exact NLL on confirm_windows
    confirm_windows: int = 4
    per_step: int = 3  # actions taken per search step (the best, then the next best of other layers)
    actions: list[str] = field(default_factory=lambda: ["attn", "mlp", "layer", "child"])  # what the search may do
    fit_windows: int = 32  # calibration windows whose activations the children are fitted on
    alpha: bool = True  # a child Linear may add alpha * parent where that lowers its calibration error
    alpha_margin: float = 0.1  # ... by more than this fraction

    def __post_init__(self):
        _check(self.group_size >= 1, "group size must be >= 1 (1 disables folding)")
        _check(self.adapter_rank >= 0, "adapter rank must be >= 0")
        _check(self.adapter_init in ("zero", "svd", "fit"), "adapter init must be 'zero', 'svd' or 'fit'")
        _check(all(0 < f < 1 for f in self.child_fractions) and len(self.child_fractions) > 0,
               "child fractions must be in (0, 1)")
        _check(self.score in ("nll", "topk"), f"search score must be 'nll' or 'topk', got '{self.score}'")
        _check(bool(self.actions) and set(self.actions) <= {"attn", "mlp", "layer", "child"},
               f"search actions must be among attn, mlp, layer, child; got {self.actions}")
        _check(self.topk >= 1 and self.search_windows >= 1 and self.fit_windows >= 1,
               "--topk, search windows and fit windows must be >= 1")
        _check(self.select in ("loss", "adjacent"), "fold selection must be 'loss' or 'adjacent'")


@dataclass
class CureConfig:
    steps: int = 50  # 50 steps of 4 x 256 tokens: the default compress stays within minutes on a laptop CPU
    batch_size: int = 4
    lr: float = 2e-3
    # learning-rate factor for fitted children's factors (own / alpha modes): Adam moves every entry by about lr per
    # step, large against the small entries of a closed-form fit
    child_lr_scale: float = 0.1
    warmup: int = 10
    alpha_kl: float = 1.0
    beta_tail: float = 1.0
    gamma_ce: float = 0.0
    tail_layers: int = 2
    tau: float = 1.0
    train_all_norms: bool = True
    train_child_norms: bool = True  # False (with train_all_norms False): the "no norm re-adaptation" ablation
    micro_batch: int = 0  # >0: split each batch into micro-batches and accumulate gradients
    grad_checkpointing: bool = False  # recompute activations in the backward pass (less memory)
    lora_rank: int = 8  # rank of the adapters on every unique Linear, merged into the weights after the cure
    precision: str = "auto"  # autocast for the cure: auto (bf16 on GPU / bf16-capable CPU, else fp32), fp32, bf16, fp16
    teacher_cache: bool = True  # teacher top-k log-probs and tail outputs computed once, not inside the loop
    teacher_topk: int = 64  # k of the cached teacher distribution
    teacher_cache_dir: str | None = None  # None: a temporary folder, deleted after the cure
    fsdp: bool = False  # under torchrun: shard each unique frozen Linear across the processes (FSDP2)
    seed: int | None = None  # the cure's own seed (data order, adapter init); None: the run's --seed

    def __post_init__(self):
        _check(self.steps >= 0, "cure steps must be >= 0")
        _check(self.tail_layers >= 0, "tail layers must be >= 0")
        _check(self.child_lr_scale >= 0, "child learning-rate scale must be >= 0")
        _check(self.lora_rank >= 0, "cure LoRA rank must be >= 0")
        _check(self.teacher_topk >= 1, "--teacher-topk must be >= 1")
        _check(self.precision in ("auto", "fp32", "bf16", "fp16"),
               f"precision must be auto, fp32, bf16 or fp16, got '{self.precision}'")


@dataclass
class CompressConfig:
    method: str = "foldgpt"
    target_params: float | None = 0.75  # fraction of unique parameters kept
    remove_rate: float | None = None  # fraction of layers removed (with group_size: sets the split directly)
    remove_share: float = 0.5  # with only a target: share of the savings taken by removal
    # foldgpt's ranking: "search" (one search over keep / delete sub-block / delete / fitted child, methods/search.py),
    # "greedy" (whole-layer or sub-block greedy NLL removal, then children fold back) or "gates" (learned gates)
    ranking: str = "search"
    protect_ends: bool = False
    seq_len: int = 256
    calib_seqs: int = 512
    seed: int = 0
    device: str = "cpu"  # "cuda", "cuda:1", "mps"...: where the model runs
    precision: str = "auto"  # autocast for gate training and fold costs (the cure has its own setting)
    streaming: bool = False  # analysis and greedy scores layer by layer on `device`, the model kept on the CPU
    device_map: str | None = None  # "auto": layers spread over the GPUs (overflow offloaded); "offload": all on CPU
    max_memory: str | None = None  # with device_map auto: "cuda:0=30GiB,cuda:1=30GiB,cpu=200GiB"
    cure: bool | None = None  # None: the method's default (foldgpt cures, peers do not)
    # training-free compensation of deleted spans (compensate.py), merged into weights: none, replaceme, linearpatch
    compensate: str = "none"
    gate: GateConfig = field(default_factory=GateConfig)
    fold: FoldConfig = field(default_factory=FoldConfig)
    cure_cfg: CureConfig = field(default_factory=CureConfig)

    def __post_init__(self):
        if self.target_params is not None:
            _check(0.0 < self.target_params < 1.0,
                   f"--target-params must be a fraction in (0, 1), got {self.target_params}")
        if self.remove_rate is not None:
            _check(0.0 <= self.remove_rate < 1.0, f"--remove-rate must be in [0, 1), got {self.remove_rate}")
        _check(self.target_params is not None or self.remove_rate is not None,
               "give --target-params or --remove-rate")
        _check(0.0 <= self.remove_share <= 1.0, "remove share must be in [0, 1]")
        _check(self.ranking in ("search", "greedy", "gates"),
               f"--ranking must be 'search', 'greedy' or 'gates', got '{self.ranking}'")
        _check(self.seq_len >= 8, "--seq-len must be >= 8")
        _check(self.calib_seqs >= 1, "calibration sequences must be >= 1")
        _check(self.precision in ("auto", "fp32", "bf16", "fp16"),
               f"precision must be auto, fp32, bf16 or fp16, got '{self.precision}'")
        _check(self.device_map in (None, "auto", "offload"),
               f"--device-map must be 'auto' or 'offload', got '{self.device_map}'")
        _check(not (self.device_map and self.streaming),
               "--streaming and --device-map both place layers; use one (--device-map also trains and cures)")
        _check(self.max_memory is None or self.device_map == "auto", "--max-memory needs --device-map auto")
        _check(self.compensate in ("none", "replaceme", "linearpatch"),
               f"--compensate must be none, replaceme or linearpatch, got '{self.compensate}'")

    def to_dict(self) -> dict:
        return asdict(self)
