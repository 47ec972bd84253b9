"""Typed, validated configuration for every stage, and the one place its defaults and choices are written: the CLI
takes its defaults and choices from here, and library code never sees argparse."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass

from .errors import FoldGPTError

# Written with every saved configuration (CompressConfig.to_dict: the plan's provenance, summary.json, a bench's
# command); raised when a field moves or changes meaning, so a saved configuration says which layout it has.
# 2: the rankings' settings in RankingConfig (`ranking` -> `ranking.kind`, `gate.unit` -> `ranking.unit`, the
# search's settings out of `fold`), the cure's switch in CureConfig (`cure` -> `cure.enabled`, `cure_cfg` -> `cure`).
CONFIG_VERSION = 2

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # autocast of the training stages (precision.autocast)
RANKINGS = ("search", "greedy", "gates")
UNITS = ("auto", "layer", "sublayer")
SEARCH_SCORES = ("nll", "topk")
SEARCH_ACTIONS = ("attn", "mlp", "layer", "child")
GATE_BUDGETS = ("project", "penalty")
ADAPTER_INITS = ("zero", "svd", "fit")  # "fit": the search's fitted children (never chosen on the command line)
FOLD_SELECTS = ("loss", "adjacent")
DEVICE_MAPS = ("auto", "offload")
COMPENSATIONS = ("none", "replaceme", "linearpatch")
QUANT_LEVELS = ("none", "int8", "int4")  # weight-only quantization of the result (quant.py)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise FoldGPTError(msg)


def _finite(obj, prefix: str = "") -> None:
    """Every number of a configuration part is finite (nan or inf, from the command line or a bench override, would
    otherwise surface as a failure deep in a stage)."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise FoldGPTError(f"setting {prefix}{f.name} must be a finite number, got {value}")


def _one_of(value, choices: tuple, name: str) -> None:
    _check(value in choices, f"{name} must be {', '.join(map(str, choices[:-1]))} or {choices[-1]}, got '{value}'")


@dataclass
class RankingConfig:
    """How foldgpt's method ranks what to delete and fold (`--ranking` and each ranking's settings)."""

    # "search" (one search over keep / delete sub-block / delete / fitted child, methods/search.py), "greedy"
    # (whole-layer or sub-block greedy NLL removal, then children fold back) or "gates" (learned gates)
    kind: str = "search"
    # greedy and gates rankings: "layer", "sublayer" (attention and MLP separately) or "auto": the greedy ranking runs
    # both searches and keeps sub-blocks only when they reach the target at a clearly lower calibration NLL
    # (methods/greedy_fold.py: AUTO_SUBLAYER_RISE), else whole layers; the gates ranking takes whole layers
    unit: str = "auto"
    # the search: fitted children at these costs (fractions of a block's parameters)
    child_fractions: list[float] = field(default_factory=lambda: [0.125, 0.25])
    rescore: int = 6  # after the first step, re-score only this many best actions (<= 0: every action, every step)
    # how the search scores actions: "nll" (through the vocabulary head) or "topk" (the teacher's top-k tokens + the
    # target: 2x cheaper on SmolLM2, more where the head is large; bench/search_agreement.py)
    score: str = "topk"
    topk: int = 64
    search_windows: int = 2  # calibration windows the search scores on
    # windows of built-in general text (Python's documentation) scored beside them, so the search weighs what an
    # action costs off the calibration text too (the fits and the cure still see only the calibration text)
    search_general: int = 0
    confirm: int = 0  # > 0: the best few of each step are scored again with the exact NLL on confirm_windows
    confirm_windows: int = 4
    per_step: int = 3  # actions taken per search step (the best, then the next best of other layers)
    refine: int = 0  # exchange rounds after the search (give one layer back parameters, re-spend them elsewhere)
    actions: list[str] = field(default_factory=lambda: list(SEARCH_ACTIONS))  # what the search may do

    def __post_init__(self):
        _one_of(self.kind, RANKINGS, "--ranking")
        _one_of(self.unit, UNITS, "ranking unit")
        _one_of(self.score, SEARCH_SCORES, "search score")
        _check(all(0 < f < 1 for f in self.child_fractions) and len(self.child_fractions) > 0,
               "child fractions must be in (0, 1)")
        _check(bool(self.actions) and set(self.actions) <= set(SEARCH_ACTIONS),
               f"search actions must be among {', '.join(SEARCH_ACTIONS)}; got {self.actions}")
        _check(self.topk >= 1 and self.search_windows >= 1, "--topk and search windows must be >= 1")
        _check(self.search_general >= 0, f"--search-general must be >= 0, got {self.search_general}")
        _check(self.per_step >= 1, f"--per-step must be >= 1, got {self.per_step}")
        _check(self.refine >= 0, f"--refine must be >= 0 (0: off), got {self.refine}")
        _check(self.confirm >= 0 and self.confirm_windows >= 1, "--confirm must be >= 0 (0: off)")
        _finite(self, "ranking.")

    @property
    def fixed_unit(self) -> str:
        """The unit a single ranking uses: "auto" is whole layers wherever no search comparison decides."""
        return "layer" if self.unit == "auto" else self.unit


@dataclass
class GateConfig:
    """Gate training (the gates ranking, gates.train_gates)."""

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
        _check(self.steps >= 1, "gate steps must be >= 1")
        _one_of(self.budget, GATE_BUDGETS, "gate budget")
        _check(self.rounds >= 1 and self.batch_size >= 1, "gate rounds and batch size must be >= 1")
        _check(self.micro_batch >= 0, f"--micro-batch must be >= 0 (0: no micro-batches), got {self.micro_batch}")
        _finite(self, "gate.")


@dataclass
class FoldConfig:
    """Folding: groups of layers sharing one layer's weights, and the children's low-rank parts."""

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
    fit_windows: int = 32  # calibration windows whose activations the children are fitted on
    alpha: bool = True  # a fitted child Linear may add alpha * parent where that lowers its calibration error
    alpha_margin: float = 0.1  # ... by more than this fraction

    def __post_init__(self):
        _check(self.group_size >= 1, "group size must be >= 1 (1 disables folding)")
        _check(self.adapter_rank >= 0, "adapter rank must be >= 0")
        _one_of(self.adapter_init, ADAPTER_INITS, "adapter init")
        _check(self.fit_windows >= 1, "fit windows must be >= 1")
        _one_of(self.select, FOLD_SELECTS, "fold selection")
        _check(self.cost_batch >= 1, "fold cost batch must be >= 1")
        _finite(self, "fold.")


@dataclass
class CureConfig:
    """The cure: distillation from the dense model into the compressed one's norms, deltas and adapters."""

    enabled: bool | None = None  # None: the method's default (foldgpt cures, peers do not)
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
    checkpoint_every: int = 25  # compress saves the cure's state every this many steps, to resume from (0: never)

    def __post_init__(self):
        _check(self.steps >= 0, "cure steps must be >= 0")
        _check(self.tail_layers >= 0, "tail layers must be >= 0")
        _check(self.child_lr_scale >= 0, "child learning-rate scale must be >= 0")
        _check(self.lora_rank >= 0, "cure LoRA rank must be >= 0")
        _check(self.teacher_topk >= 1, "--teacher-topk must be >= 1")
        _check(self.checkpoint_every >= 0, "--cure-checkpoint-every must be >= 0 (0: no checkpoints)")
        _one_of(self.precision, PRECISIONS, "precision")
        _check(math.isfinite(self.lr) and self.lr > 0, f"--cure-lr must be a finite number > 0, got {self.lr}")
        _check(self.micro_batch >= 0, f"--micro-batch must be >= 0 (0: no micro-batches), got {self.micro_batch}")
        _check(self.batch_size >= 1 and self.warmup >= 0, "cure batch size must be >= 1 and warmup >= 0")
        _finite(self, "cure.")


@dataclass
class CompressConfig:
    method: str = "foldgpt"
    target_params: float | None = 0.75  # fraction of unique parameters kept
    remove_rate: float | None = None  # fraction of layers removed (with group_size: sets the split directly)
    remove_share: float = 0.5  # with only a target: share of the savings taken by removal
    protect_ends: bool = False
    seq_len: int = 256
    calib_seqs: int = 512
    # share of the calibration windows drawn from built-in general text (Python's documentation), so the fits, the
    # search and the cure also see text of another kind than the user's (0 when no --text is given)
    general_share: float = 0.0
    seed: int = 0
    device: str = "cpu"  # "cuda", "cuda:1", "mps"...: where the model runs
    precision: str = "auto"  # autocast for gate training and fold costs (the cure has its own setting)
    streaming: bool = False  # analysis and greedy scores layer by layer on `device`, the model kept on the CPU
    device_map: str | None = None  # "auto": layers spread over the GPUs (overflow offloaded); "offload": all on CPU
    max_memory: str | None = None  # with device_map auto: "cuda:0=30GiB,cuda:1=30GiB,cpu=200GiB"
    # training-free compensation of deleted spans (compensate.py), merged into weights: none, replaceme, linearpatch
    compensate: str = "none"
    quantize: str = "none"  # weight-only quantization of the result, after the cure (quant.py): none, int8, int4
    # a byte budget for the weights file ("100MB", "0.5GB"): chooses target_params and quantize (size.py)
    target_size: str | None = None
    ranking: RankingConfig = field(default_factory=RankingConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    fold: FoldConfig = field(default_factory=FoldConfig)
    cure: CureConfig = field(default_factory=CureConfig)

    def __post_init__(self):
        if self.target_params is not None:
            _check(0.0 < self.target_params < 1.0,
                   f"--target-params must be a fraction in (0, 1), got {self.target_params}")
        if self.remove_rate is not None:
            _check(0.0 <= self.remove_rate < 1.0, f"--remove-rate must be in [0, 1), got {self.remove_rate}")
        _check(self.target_params is not None or self.remove_rate is not None or self.target_size is not None,
               "give --target-params or --remove-rate")
        _one_of(self.quantize, QUANT_LEVELS, "--quantize")
        if self.target_size is not None:
            from .size import parse_size

            parse_size(self.target_size)
            _check(self.target_params is None and self.remove_rate is None and self.quantize == "none",
                   "--target-size chooses the parameter target and the quantization level; drop --target-params, "
                   "--remove-rate and --quantize, or drop --target-size")
        _check(0.0 <= self.remove_share <= 1.0, "remove share must be in [0, 1]")
        _check(self.seq_len >= 8, "--seq-len must be >= 8")
        _check(self.calib_seqs >= 1, "calibration sequences must be >= 1")
        _check(0.0 <= self.general_share < 1.0, f"--general-share must be in [0, 1), got {self.general_share}")
        _one_of(self.precision, PRECISIONS, "precision")
        _check(self.device_map in (None, *DEVICE_MAPS),
               f"--device-map must be {' or '.join(repr(m) for m in DEVICE_MAPS)}, got '{self.device_map}'")
        _check(not (self.device_map and self.streaming),
               "--streaming and --device-map both place layers; use one (--device-map also trains and cures)")
        _check(self.max_memory is None or self.device_map == "auto",
               "--max-memory needs --device-map auto; add --device-map auto or drop --max-memory")
        _one_of(self.compensate, COMPENSATIONS, "--compensate")
        _finite(self)

    def to_dict(self) -> dict:
        """Every setting, with the layout's CONFIG_VERSION."""
        return {"version": CONFIG_VERSION, **asdict(self)}


@dataclass
class EvalConfig:
    """What `foldgpt eval` and `foldgpt bench` measure of a model (evaluate.evaluate_model)."""

    seq_len: int = 512  # perplexity windows
    max_tokens: int | None = None  # at most this many predicted tokens of each text (whole windows)
    batch_size: int = 4  # perplexity windows per forward pass
    tasks: list[str] = field(default_factory=list)  # BIG-bench task.json (or folders) / JSONL files
    task_limit: int | None = None  # first N examples of each task (and of each lm-eval task)
    cloze: int = 0  # > 0: a LAMBADA-style cloze task of this many examples from the evaluation text
    lm_eval: list[str] = field(default_factory=list)  # lm-evaluation-harness tasks (optional extra)

    def __post_init__(self):
        _check(self.seq_len >= 2, "--seq-len must be >= 2")
        _check(self.batch_size >= 1, "--batch-size must be >= 1")
        _check(self.task_limit is None or self.task_limit >= 1, "--task-limit must be >= 1")
        _check(self.cloze >= 0, "--cloze must be >= 0")
        _check(self.max_tokens is None or self.max_tokens >= 1, f"--max-tokens must be >= 1, got {self.max_tokens}")


def with_settings(cfg, settings: dict[str, object]):
    """A copy of the configuration `cfg` with the fields at dotted paths set (`{"fold.adapter_rank": 16}`), every
    part checked again afterwards."""
    cfg = copy.deepcopy(cfg)
    for path, value in settings.items():
        *parents, leaf = path.split(".")
        obj = cfg
        for name in parents:
            obj = _field(obj, name, path)
        _field(obj, leaf, path)
        setattr(obj, leaf, value)
    _recheck(cfg)
    return cfg


def _field(obj, name: str, path: str):
    if not (is_dataclass(obj) and name in {f.name for f in fields(obj)}):
        raise FoldGPTError(f"unknown setting '{path}'")
    return getattr(obj, name)


def _recheck(obj) -> None:
    for f in fields(obj):
        if is_dataclass(value := getattr(obj, f.name)):
            _recheck(value)
    if hasattr(obj, "__post_init__"):
        obj.__post_init__()
