"""Typed schema of params.yaml: one section per stage plus shared sections.

Every stage validates the whole file before doing anything, so a typo anywhere stops the run with one line
naming the key (`ParamsError`). Unknown keys are errors, not silently ignored. Later stages add their own
section models here; defaults make every section optional.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from components.errors import ParamsError


class Section(BaseModel):
    # allow_inf_nan=False: `lr: .inf` or `.nan` is a params error, not a traceback deep inside training.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


TOY2D_NAMES = ("checkerboard", "moons", "eight_gaussians", "spirals")
SOURCES = ("toy2d", "digits", "image_folder", "npz", "cifar10")


class DataParams(Section):
    """Where the data comes from (shared: the shard stage reads it, later stages read the shard manifest)."""

    source: Literal["toy2d", "digits", "image_folder", "npz", "cifar10"] = "toy2d"
    name: Literal["checkerboard", "moons", "eight_gaussians", "spirals"] = "checkerboard"  # toy2d only
    n_samples: int = Field(20000, ge=4)  # toy2d only: train + val
    path: Optional[str] = None  # image_folder / npz / cifar10: a local path
    npz_x_key: str = "x"
    npz_y_key: str = "y"  # optional in the file; no labels when absent
    grayscale: bool = False  # image_folder: convert to 1 channel
    max_samples: Optional[int] = Field(None, ge=4)  # keep only the first N (after a seeded shuffle)
    seed: int = 0

    @model_validator(mode="after")
    def _path_needed(self) -> "DataParams":
        if self.source in ("image_folder", "npz", "cifar10") and not self.path:
            raise ValueError(f"path is required for source '{self.source}'")
        return self


class ShardParams(Section):
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    samples_per_shard: int = Field(2000, ge=1)
    min_shards: int = Field(4, ge=1)  # per split: at least world_size x loader workers
    samples_per_record: int = Field(256, ge=1)  # samples per tar record (1 = one sample per record)
    seed: int = 0  # train/val split


class MLPParams(Section):
    width: int = Field(256, ge=1)
    depth: int = Field(4, ge=1)
    embed_dim: int = Field(64, ge=2)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class UNetParams(Section):
    base_channels: int = Field(32, ge=1)
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = Field(1, ge=1)
    attention_resolutions: tuple[int, ...] = ()
    num_heads: int = Field(1, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class ModelParams(Section):
    """Network architecture, shared by the teacher and the students initialised from it."""

    kind: Literal["auto", "mlp", "unet"] = "auto"  # auto: mlp for points, unet for images
    mlp: MLPParams = MLPParams()
    unet: UNetParams = UNetParams()


class SamplerParams(Section):
    method: Literal["euler", "heun", "ddim", "dpmpp_2m", "edm_stochastic"] = "heun"
    grid: Literal["auto", "edm", "uniform", "logsnr"] = "auto"  # auto: edm for edm, logsnr for eps, uniform for flow
    steps: int = Field(32, ge=1)
    guidance: float = Field(1.0, ge=0.0)  # classifier-free guidance weight w (1 = plain conditional)


# The constraints of the Trainer's settings, declared once; stage sections restate only their own defaults.
Count = Annotated[int, Field(ge=1)]             # steps, samples
Period = Annotated[int, Field(ge=0)]            # warmup and checkpoint periods in steps (0: none)
Rate = Annotated[float, Field(gt=0.0)]
Decay = Annotated[float, Field(ge=0.0, lt=1.0)]


class TrainConfig(Section):
    """The optimisation settings of the one Trainer: the only schema of training settings. Stage sections
    (TeacherParams, ReflowParams, ...) extend it through TrainParams with their own defaults.

    ``batch_size`` is global (all ranks, all accumulation micro-steps); each micro-batch the Trainer gets holds
    ``batch_size / (world_size * grad_accum)`` samples. ``checkpoint_every = 0`` saves only at the end;
    ``grad_clip = 0`` disables clipping.
    """

    steps: Count = 1000
    batch_size: Count = 256  # global, over all processes and accumulation steps
    lr: Rate = 1e-3
    warmup_steps: Period = 0
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, ge=0.0)
    grad_accum: Count = 1
    ema_decay: Decay = 0.999
    zero_stage: Literal[0, 1, 2] = 0  # DeepSpeed ZeRO stage
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    checkpoint_every: Period = 0
    log_every: Count = 50
    keep_checkpoints: Count = 2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    progress_bar: bool = True
    seed: int = 0

    def resolved_precision(self) -> str:
        """"auto" -> "bf16" when CUDA is available, else "fp32"."""
        if self.precision == "auto":
            import torch

            return "bf16" if torch.cuda.is_available() else "fp32"
        return self.precision

    def micro_batch_size(self, world_size: int) -> int:
        """Per-rank micro-batch size; raises ValueError when batch_size does not split evenly."""
        divisor = world_size * self.grad_accum
        if self.batch_size % divisor != 0:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by world_size={world_size} x "
                             f"grad_accum={self.grad_accum} = {divisor}")
        return self.batch_size // divisor


# Settings that do not change what a run computes: a checkpoint written under other values resumes (raising
# `steps` continues training).
RESUMABLE_SETTINGS = ("steps", "checkpoint_every", "log_every", "keep_checkpoints", "progress_bar")


class TrainParams(TrainConfig):
    """A training stage's section: the Trainer's settings plus this process's threads (how many processes every
    training stage runs on is the `distributed` section)."""

    torch_threads: int = Field(0, ge=0)  # 0 = auto: 1 for the MLP (threads only add sync cost), all cores for the UNet

    def train_config(self, **overrides: Any) -> TrainConfig:
        """The Trainer's settings of this section (with `overrides`, validated)."""
        values = self.model_dump(include=set(TrainConfig.model_fields))
        return TrainConfig(**{**values, **overrides})


class TeacherParams(TrainParams):
    steps: Count = 3000
    batch_size: Count = 1024
    lr: Rate = 2e-3
    warmup_steps: Period = 100
    checkpoint_every: Period = 500
    objective: Literal["edm", "eps", "flow"] = "flow"  # measured best on the default data (bench_teacher)
    conditional: bool = False  # class-conditional with label dropout (classifier-free guidance)
    p_uncond: float = Field(0.1, ge=0.0, le=1.0)
    sampler: SamplerParams = SamplerParams()
    plot_samples: int = Field(2000, ge=1)



class CouplingsParams(Section):
    """Teacher ODE couplings (z, x = teacher(z)) for reflow: how many, which solver, how accurate."""

    count: int = Field(10000, ge=1)  # pairs generated (20000 measured no better on the default data)
    batch_size: int = Field(2000, ge=1)  # pairs per solver batch (and per resumable chunk)
    solver: Literal["heun", "euler", "dpmpp_2m"] = "heun"
    nfe: int = Field(64, ge=1)  # teacher evaluations per pair (heun: 32 steps for 64)
    max_error: float = Field(0.02, gt=0.0)  # warn above this relative RMS error vs a 4x-NFE solve (default teacher, nfe 64: 0.013)
    error_samples: int = Field(256, ge=1)  # pairs re-solved at 4x NFE to measure the error
    samples_per_shard: int = Field(5000, ge=1)
    samples_per_record: int = Field(256, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _count_fits(self) -> "CouplingsParams":
        if self.count < self.batch_size:
            raise ValueError(f"count {self.count} is smaller than batch_size {self.batch_size}")
        return self


class ReflowParams(TrainParams):
    """Rectified-flow training on the couplings (the one Trainer), initialised from the teacher."""

    steps: Count = 800
    batch_size: Count = 512
    warmup_steps: Period = 50
    checkpoint_every: Period = 200
    rounds: int = Field(1, ge=1)  # k-rectified flow: rounds > 1 regenerate couplings from the last student
    # Then distil the reflowed model into this many Euler steps (0: off; 1: one-step distillation). 2 is the
    # default: measured on the default data, 2 distilled steps match the teacher's best SW2 (bench_reflow).
    distill_nfe: int = Field(2, ge=0, le=16)
    distill_steps: int = Field(400, ge=1)
    p_uncond: float = Field(0.1, ge=0.0, le=1.0)  # label dropout for a conditional teacher
    sampler_steps: int = Field(2, ge=1)  # default Euler steps in models/reflow/model.json

class RewardParams(Section):
    """The reward of preference pairs (components/preferences/rewards.py)."""

    kind: Literal["region", "function", "classifier", "bradley_terry"] = "region"
    squares: list[Annotated[int, Field(ge=0, le=7)]] = Field(default_factory=lambda: [0, 1])  # region: checkerboard squares
    boxes: list[list[float]] = Field(default_factory=list)  # region: [xmin, ymin, xmax, ymax] boxes (any 2-D data)
    function: Optional[str] = None  # function: "module:function", f(x [N, ...], cond [N] | None) -> [N]
    target_class: Optional[int] = Field(None, ge=0)  # classifier: class to prefer (null: each sample's condition)


class PreferencesParams(Section):
    """The preferences stage: K samples per group from the reference model, scored, paired by rank."""

    model: str = Field("teacher", pattern=r"^[a-z][a-z0-9_]*$")  # models/<model> generates the pairs
    reward: RewardParams = RewardParams()
    groups: int = Field(8, ge=1)  # condition groups (class labels cycle for conditional models)
    k: int = Field(256, ge=2)  # samples per group
    min_margin: float = Field(0.05, ge=0.0)  # minimum score difference of a kept pair
    nfe: Optional[int] = Field(None, ge=1)  # sampling budget; null: the model's default sampler
    pairs_file: Optional[str] = None  # a labelled JSONL file of pairs instead of sampling + scoring
    reward_model_steps: int = Field(300, ge=1)  # Bradley-Terry reward model fitted on a labelled file
    seed: int = 0


class DPOParams(TrainParams):
    """The dpo stage: Diffusion-DPO fine-tuning of a copy of the reference against the frozen reference."""

    beta: float = Field(1000.0, gt=0.0)  # effective beta (diffusers convention: 0.5 x the original code's)
    holdout_fraction: float = Field(0.1, gt=0.0, lt=1.0)  # pairs kept out of training (implicit accuracy)
    steps: Count = 200
    lr: Rate = 1e-4
    warmup_steps: Period = 20
    ema_decay: Decay = 0.95
    checkpoint_every: Period = 100
    log_every: Count = 20


class ProgressiveParams(TrainParams):
    """Progressive distillation: rounds teacher_steps -> teacher_steps/2 -> ... -> 1; `steps` etc. are per round."""

    teacher_steps: int = Field(16, ge=2)  # the teacher's DDIM steps (uniform grid); a power of two
    weighting: Literal["truncated_snr", "snr_plus_one", "constant"] = "truncated_snr"
    steps: Count = 300
    ema_decay: Decay = 0.99
    checkpoint_every: Period = 100

    @model_validator(mode="after")
    def _power_of_two(self) -> "ProgressiveParams":
        if self.teacher_steps & (self.teacher_steps - 1):
            raise ValueError(f"teacher_steps must be a power of two to halve down to 1, got {self.teacher_steps}")
        return self


class ConsistencyParams(TrainParams):
    """Consistency distillation (mode distill, from the teacher) or training (mode train, no teacher)."""

    mode: Literal["distill", "train"] = "distill"
    n_scales: int = Field(18, ge=2)  # Karras grid points N
    sigma_min: float = Field(0.002, gt=0.0)
    sigma_max: float = Field(80.0, gt=0.0)
    rho: float = Field(7.0, gt=0.0)
    target: Literal["ema", "stopgrad"] = "ema"
    target_ema: float = Field(0.95, ge=0.0, lt=1.0)
    huber_c: Optional[float] = Field(None, gt=0.0)  # None: 0.00054 sqrt(dim)
    sampler_steps: int = Field(1, ge=1)  # default sampling (evaluate sweeps its own NFE grid)
    steps: Count = 800
    lr: Rate = 5e-4
    ema_decay: Decay = 0.99
    checkpoint_every: Period = 200

    @model_validator(mode="after")
    def _range(self) -> "ConsistencyParams":
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min must be < sigma_max, got {self.sigma_min} >= {self.sigma_max}")
        return self


class FeaturizerParams(TrainParams):
    """The reference classifier of image evaluation (trained on the train split only with the one Trainer; skipped
    for 2-D data)."""

    steps: Count = 500
    batch_size: Count = 128
    lr: Rate = 2e-3
    # No EMA: the classifier's own last weights are the features (as before the recipe); its held-out accuracy
    # is measured on exactly what evaluate uses.
    ema_decay: Decay = 0.0
    checkpoint_every: Period = 100


class EvaluateParams(Section):
    """The evaluate stage: which models, which NFE grid, how many samples (protocol in DESIGN.md)."""

    # Model stages to evaluate: models/<name>/ each. A listed model whose directory does not exist is skipped
    # with a warning, unless models/<name> is a dep of the evaluate stage in dvc.yaml (then it is an error).
    models: list[str] = Field(default_factory=lambda: ["teacher", "reflow", "progressive", "consistency", "dpo"], min_length=1)
    nfe: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64], min_length=1)
    # Generated samples per NFE point (= real samples per floor set). None: 10000 for toy 2-D data (fresh held-out
    # draws), val count // 2 otherwise (images: vs the train split as reference).
    n_samples: Optional[int] = Field(None, ge=10)
    n_sweep: int = Field(512, ge=10)  # samples per sampler x grid candidate when picking the best sampler per NFE
    samplers: list[Literal["euler", "heun", "ddim", "dpmpp_2m"]] = Field(
        default_factory=lambda: ["euler", "heun", "dpmpp_2m", "ddim"], min_length=1)
    grids: list[Literal["uniform", "edm", "logsnr"]] = Field(
        default_factory=lambda: ["uniform", "edm", "logsnr"], min_length=1)
    seed: int = 0  # noise and class labels of the generated samples (the same at every NFE)
    straightness_steps: int = Field(32, ge=2)  # Euler steps, uniform in flow time, same for every model
    straightness_samples: int = Field(2000, ge=10)  # paths per model for the straightness
    image_grid_size: int = Field(64, ge=1)  # images per sample grid
    inception_weights: Optional[str] = None  # a local Inception weights file: also compute Inception-FID
    allow_missing_inception: bool = False  # true: a missing weights file is a warning, not an error

    @model_validator(mode="after")
    def _unique(self) -> "EvaluateParams":
        if len(set(self.nfe)) != len(self.nfe):
            raise ValueError(f"nfe: values must be unique, got {self.nfe}")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models: names must be unique, got {self.models}")
        bad = [m for m in self.models if not re.fullmatch(r"[a-z][a-z0-9_]*", m)]
        if bad:
            raise ValueError(f"models: '{bad[0]}' is not a stage name (lowercase letters, digits, _)")
        return self


class DistributedParams(Section):
    """How many processes every training stage runs on (one DeepSpeed rank each, launched by torchrun).

    What differs per machine is not here but in the environment the launcher reads: this machine's node rank
    (NODE_RANK, else Slurm's SLURM_NODEID) and the rendezvous endpoint (MASTER_ADDR, MASTER_PORT: node 0's
    address, which is also the only interface node 0 listens on). One node needs none of them.
    """

    processes_per_node: int = Field(1, ge=1)  # e.g. the GPUs of one machine; >1 launches ranks with torchrun
    nodes: int = Field(1, ge=1)  # machines; every one runs the same params (README "Scaling out")
    timeout_s: int = Field(300, ge=10)  # a collective waiting this long on a dead rank stops the job

    @property
    def world_size(self) -> int:
        return self.processes_per_node * self.nodes


TRAINING_SECTIONS = ("teacher", "reflow", "progressive", "consistency", "dpo", "featurizer")  # global batch split over ranks


class TrackingParams(Section):
    experiment: str = "diffusion-distill"
    # None: sqlite:///<repo>/mlflow.db ; MLFLOW_TRACKING_URI overrides both.
    uri: Optional[str] = None


class Params(Section):
    """The whole params.yaml."""

    tracking: TrackingParams = TrackingParams()
    data: DataParams = DataParams()
    shard: ShardParams = ShardParams()
    model: ModelParams = ModelParams()
    teacher: TeacherParams = TeacherParams()
    progressive: ProgressiveParams = ProgressiveParams()
    consistency: ConsistencyParams = ConsistencyParams()
    couplings: CouplingsParams = CouplingsParams()
    reflow: ReflowParams = ReflowParams()

    featurizer: FeaturizerParams = FeaturizerParams()
    evaluate: EvaluateParams = EvaluateParams()
    preferences: PreferencesParams = PreferencesParams()
    dpo: DPOParams = DPOParams()
    distributed: DistributedParams = DistributedParams()

    @model_validator(mode="after")
    def _batch_splits_over_ranks(self) -> "Params":
        world = self.distributed.world_size
        for name in TRAINING_SECTIONS:
            section = getattr(self, name)
            split = world * section.grad_accum
            if section.batch_size % split:
                raise ValueError(
                    f"{name}.batch_size {section.batch_size} is not divisible by distributed.processes_per_node x "
                    f"distributed.nodes x {name}.grad_accum = {self.distributed.processes_per_node} x "
                    f"{self.distributed.nodes} x {section.grad_accum} = {split}")
        return self

    def section(self, name: str) -> Section:
        return getattr(self, name)


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # 2e-5, 1.5E3, .5e1


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", yaml-parsed value). The same syntax as `dvc exp run --set-param`."""
    if "=" not in text:
        raise ParamsError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ParamsError(f"override '{text}' has an empty key")
    if not raw.strip():
        return key, None
    value = yaml.safe_load(raw)
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(raw.strip()):
        value = float(raw)  # PyYAML (YAML 1.1) reads 2e-5 as a string; DVC's -S parser (YAML 1.2) as a float
    return key, value


def apply_overrides(raw: dict, overrides: list[str] | dict[str, Any]) -> dict:
    """Return a copy of `raw` with dotted-key overrides applied (unknown keys are caught by validation)."""
    out = _deep_copy(raw)
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for key, value in items:
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise ParamsError(f"override {key}: '{part}' is not a section")
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def validate_params(raw: dict, source: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as e:
        raise ParamsError(format_validation_error(e, source)) from None


RENAMED_KEYS = {  # old key -> what replaced it (named in the "unknown key" error)
    "reflow.distill_one_step": "reflow.distill_nfe (0: off, 1: one step, 2: two steps)",
    **{f"{name}.processes": "distributed.processes_per_node, one setting for every training stage"
       for name in TRAINING_SECTIONS},
}


def format_validation_error(e: ValidationError, source: str) -> str:
    """One line: the first error with its dotted key, the offending value and pydantic's reason."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        renamed = f" (replaced by {RENAMED_KEYS[loc]})" if loc in RENAMED_KEYS else ""
        return f"{source}: unknown key '{loc}'{renamed}"
    if err["type"] == "value_error":  # a model validator: its message starts with the key inside `loc`
        prefix = f"{loc}." if loc else ""
        return f"{source}: {prefix}{msg.removeprefix('Value error, ')}"
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" = {value!r}"
    extra = f" ({len(e.errors()) - 1} more problem(s))" if len(e.errors()) > 1 else ""
    return f"{source}: {loc}{shown}: {msg}{extra}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (PyYAML keeps the last one silently; DVC refuses)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise DuplicateKeyError(key, seen[key], key_node.start_mark.line + 1)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, first_line: int, line: int):
        super().__init__(f"duplicate key '{key}' (line {line}; first at line {first_line})")
        self.key, self.first_line, self.line = key, first_line, line


def read_params_file(path: Path | str) -> dict:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params file not found: {path}")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except DuplicateKeyError as e:
        raise ParamsError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ParamsError(f"{path}: not valid YAML{where}") from None
    except OSError as e:
        raise ParamsError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections")
    return raw


def load_params(path: Path | str = "params.yaml", overrides: list[str] | dict | None = None,
                source: Optional[str] = None) -> Params:
    """The params file with `overrides` applied, validated; errors name `source` (default: the file's name)."""
    raw = read_params_file(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    return validate_params(raw, source=source or Path(path).name)


def write_overrides(params_file: Path, overrides: dict[str, Any]) -> None:
    """Set dotted keys in the params file in place, keeping comments and order (round-trip YAML, as
    `dvc exp run -S` does)."""
    from ruamel.yaml import YAML

    yaml_rt = YAML()
    yaml_rt.preserve_quotes = True
    yaml_rt.width = 4096  # never re-wrap long flow-style lines
    yaml_rt.representer.add_representer(  # keep `null` spelled out (ruamel writes an empty value by default)
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    data = yaml_rt.load(Path(params_file).read_text())
    for key, value in overrides.items():
        node = data
        *sections, leaf = key.split(".")
        for section in sections:
            if node.get(section) is None:
                node[section] = {}
            node = node[section]
        node[leaf] = value
    with open(params_file, "w") as f:
        yaml_rt.dump(data, f)
