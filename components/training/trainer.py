"""The one Trainer: a DeepSpeed engine, EMA, checkpoint/resume, progress bar and metric callbacks.

Every training stage (teacher, reflow, distillation, DPO) uses this class with its own ``loss_fn``.
Checkpoint layout inside ``checkpoint_dir``::

    step00000100/            DeepSpeed files (+ client_state: EMA, step, fingerprint)
    step00000100/trainer_state.json   step, fingerprint, last loss (read before any tensor is loaded)
    step00000100/rng_rank<r>.pt       torch RNG state of rank r (exact resume of noise sampling)
    latest                   name of the newest complete checkpoint (written last, atomically)
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from components.config import TrainConfig
from components.errors import UserError

from .distributed import broadcast_from_rank0, init_process_group, world_info
from .ema import EMA

LossFn = Callable[[nn.Module, dict], tuple[torch.Tensor, dict[str, float]]]
LogFn = Callable[[dict[str, float], int], None]

_LATEST_FILE = "latest"
_STATE_FILE = "trainer_state.json"


class CheckpointMismatchError(UserError, ValueError):
    """The checkpoint in ``checkpoint_dir`` was written for a different model/config (fingerprint differs)."""


class UnreadableCheckpointError(UserError, ValueError):
    """A checkpoint file cannot be read (truncated, garbage, or holding objects beyond plain tensors and containers)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path


class NonFiniteLossError(UserError, RuntimeError):
    """Training produced a NaN/inf loss (or weights); the last good checkpoint is left in place."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns: optimizer steps reached, last loss, logged metric history."""

    steps: int
    final_loss: float
    history: list[dict[str, float]] = field(default_factory=list)


def build_optimizer(parameters, config: TrainConfig) -> torch.optim.Optimizer:
    """torch's AdamW with its fused kernel (CPU and CUDA): on the default MLP an optimizer step takes 0.9 ms instead
    of 3.0 ms on one CPU thread, the same update to float rounding (~3e-8). Handed to DeepSpeed as the client
    optimizer; DeepSpeed's own FusedAdam would need a slow JIT C++ build on CPU."""
    settings = {"lr": config.lr, "betas": tuple(config.adam_betas), "eps": 1e-8, "weight_decay": config.weight_decay}
    try:
        return torch.optim.AdamW(parameters, fused=True, **settings)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(parameters, **settings)


def build_deepspeed_config(config: TrainConfig, world_size: int, engine_clips: bool = True) -> dict[str, Any]:
    """Translate a :class:`TrainConfig` into a DeepSpeed config dict (batch split, WarmupLR, clipping, ZeRO, bf16);
    the optimizer is :func:`build_optimizer`'s, handed to the engine.

    ``engine_clips=False`` leaves gradient clipping to the caller (the Trainer clips itself when the
    gradients are plain fp32 ``.grad`` tensors, i.e. ZeRO 0 without bf16). Warmup is linear from 0: the Trainer advances the scheduler so that optimizer step s (1-based) uses
    ``lr * min(1, s / warmup_steps)``.
    """
    micro = config.micro_batch_size(world_size)
    ds_config: dict[str, Any] = {
        "train_batch_size": config.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": config.grad_accum,
        "gradient_clipping": float(config.grad_clip) if engine_clips else 0.0,
        "zero_optimization": {"stage": config.zero_stage},
        "bf16": {"enabled": config.resolved_precision() == "bf16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if config.warmup_steps > 0:
        ds_config["scheduler"] = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": config.lr,
                "warmup_num_steps": config.warmup_steps,
                "warmup_type": "linear",
            },
        }
    return ds_config


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b": value}, values made JSON-comparable (tuples become lists)."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = json.loads(json.dumps(value, default=str))
    return flat


def _differing_keys(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    missing = object()
    return sorted(k for k in set(saved) | set(current) if saved.get(k, missing) != current.get(k, missing))


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _checkpoint_safe_globals() -> list:
    """The only non-container types in DeepSpeed's checkpoints (found with torch's get_unsafe_globals_in_checkpoint
    over ZeRO 0/1/2 x fp32/bf16): plain data classes, constructed without running any of the file's code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str, map_location=None):
    """``torch.load`` with ``weights_only=True`` (no arbitrary unpickling) plus DeepSpeed's few plain types.

    Raises :class:`UnreadableCheckpointError` naming the file when it is corrupt or holds anything else."""
    try:
        with torch.serialization.safe_globals(_checkpoint_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types; all mean "unreadable"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnreadableCheckpointError(str(path), f"{type(e).__name__}: {reason}") from None


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class Trainer:
    """Train ``model`` with ``loss_fn`` on a DeepSpeed engine, keeping an EMA and resumable checkpoints.

    Args:
        model: the bare network (an ``nn.Module``); its EMA is what gets exported.
        loss_fn: ``loss_fn(engine, batch) -> (scalar loss, metrics)``; ``engine`` is called like the model.
        config: optimisation settings.
        checkpoint_dir: where checkpoints go; ``fit`` resumes from the newest one found there.
        log_fn: ``log_fn(metrics, step)``, called on rank 0 every ``config.log_every`` steps.
        fingerprint: JSON-able dict describing the run (model config, objective, ...); a checkpoint written
            under a different fingerprint raises :class:`CheckpointMismatchError` instead of being loaded.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        config: TrainConfig,
        checkpoint_dir: Path | str,
        log_fn: LogFn | None = None,
        fingerprint: Mapping[str, Any] | None = None,
    ) -> None:
        init_process_group()
        import deepspeed  # imported late: importing it probes the accelerator, which is slow

        # DeepSpeed logs its whole config at INFO on every engine; keep the console for the progress bar.
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.rank, self.world_size = world_info()
        self.config = config
        self.loss_fn = loss_fn
        self.log_fn = log_fn
        self.checkpoint_dir = Path(checkpoint_dir)
        self.micro_batch_size = config.micro_batch_size(self.world_size)
        # With ZeRO 0 in fp32 the gradients are ordinary .grad tensors: clipping them here with torch's
        # fused clip_grad_norm_ is exact, gives the grad norm for free, and avoids DeepSpeed's per-tensor
        # clipping loop (about 0.7 ms per step on CPU). Other modes keep gradients inside DeepSpeed's
        # optimizer, so DeepSpeed clips them.
        self._trainer_clips = config.zero_stage == 0 and config.resolved_precision() == "fp32"

        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=build_optimizer([p for p in model.parameters() if p.requires_grad], config),
            config=build_deepspeed_config(config, self.world_size, engine_clips=not self._trainer_clips),
        )
        # DeepSpeed unpickles checkpoint files with weights_only=False: files under checkpoints/ would run any code
        # they hold. Every file it reads goes through its checkpoint engine's load, so that is where we restrict it.
        self.engine.checkpoint_engine.load = safe_torch_load
        if self.world_size == 1 and config.zero_stage == 0:
            # A one-rank "all-reduce" of the gradients is the identity, but DeepSpeed still flattens, reduces
            # and copies back every gradient each step (about 0.6 ms per step on CPU): skip it.
            self.engine.enable_backward_allreduce = False
        if self.engine.lr_scheduler is not None:
            # DeepSpeed's WarmupLR gives lr=0 to the first two optimizer steps (iterations -1 and 0). Two
            # scheduler steps here make optimizer step s use lr * min(1, s / warmup_steps); a resumed run
            # restores the scheduler's own state from the checkpoint instead.
            self.engine.lr_scheduler.step()
            self.engine.lr_scheduler.step()
        # EMA after initialize: DeepSpeed has broadcast rank 0's weights (and cast them for bf16).
        self.ema = EMA(self.engine.module, config.ema_decay)
        self.fingerprint = self._full_fingerprint(fingerprint or {})
        self.step = 0
        self.last_loss = float("nan")
        self._last_saved_step: int | None = None
        # Data-independent randomness (noise, times, label dropout) differs per rank but is reproducible.
        torch.manual_seed(config.seed + self.rank)

    @property
    def model(self) -> nn.Module:
        """The live (non-averaged) module inside the engine."""
        return self.engine.module

    def _full_fingerprint(self, user: Mapping[str, Any]) -> dict[str, Any]:
        shapes = [f"{name}:{tuple(p.shape)}" for name, p in self.engine.module.state_dict().items()]
        flat = _flatten(user)
        flat["trainer.parameter_shapes"] = shapes
        flat["trainer.precision"] = self.config.resolved_precision()
        flat["trainer.zero_stage"] = self.config.zero_stage
        if self.config.zero_stage > 0:
            # Partitioned optimizer states are only loadable by the same number of ranks.
            flat["trainer.world_size"] = self.world_size
        return flat

    # ------------------------------------------------------------------ checkpoints

    def latest_checkpoint(self) -> tuple[str, dict[str, Any]] | None:
        """Return (tag, trainer_state) of the newest complete checkpoint, or None when there is none."""
        found = self._complete_checkpoints()
        return found[0] if found else None

    def _complete_checkpoints(self) -> list[tuple[str, dict[str, Any]]]:
        """(tag, trainer_state) of every checkpoint whose state file is readable, newest first; tags newer than the
        ``latest`` pointer (a save cut short) are left out."""
        pointer = self.checkpoint_dir / _LATEST_FILE
        if not pointer.is_file():
            return []
        newest = pointer.read_text().strip()
        found = []
        for tag_dir in sorted(self.checkpoint_dir.glob("step*"), reverse=True):
            if tag_dir.name > newest or not (tag_dir / _STATE_FILE).is_file():
                continue
            try:
                found.append((tag_dir.name, json.loads((tag_dir / _STATE_FILE).read_text())))
            except (json.JSONDecodeError, UnicodeDecodeError):
                print(f"warning: {tag_dir / _STATE_FILE} is unreadable; skipping that checkpoint", file=sys.stderr)
        return found

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on at least one (so all ranks take the same branch)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.engine.device)
        dist.all_reduce(value)
        return bool(value.item() > 0)

    def _check_resumable(self, tag: str, state: Mapping[str, Any]) -> None:
        """One-line errors for a checkpoint this run cannot continue (other model, other rank count, more steps)."""
        where = self.checkpoint_dir / tag
        differing = _differing_keys(state.get("fingerprint", {}), self.fingerprint)
        if differing == ["trainer.world_size"]:
            saved = state["fingerprint"]["trainer.world_size"]
            raise CheckpointMismatchError(
                f"checkpoint {where} was written by {saved} ranks with ZeRO stage {self.config.zero_stage}, whose "
                f"optimizer state is split per rank; this run has {self.world_size}: rerun with distributed."
                f"processes_per_node x distributed.nodes = {saved}, or delete {self.checkpoint_dir} to start over")
        if differing:
            raise CheckpointMismatchError(
                f"checkpoint {where} was written with a different fingerprint; "
                f"differing keys: {', '.join(differing)}; delete {self.checkpoint_dir} to train from scratch"
            )
        if int(state["step"]) > self.config.steps:
            raise CheckpointMismatchError(
                f"checkpoint {where} is at step {state['step']} but steps is {self.config.steps}: set steps >= "
                f"{state['step']} to continue it, or delete {self.checkpoint_dir} to train {self.config.steps} "
                f"steps from scratch")

    def _resume(self) -> bool:
        # Rank 0 decides which checkpoints exist; every rank must see them (a shared filesystem across nodes).
        candidates = broadcast_from_rank0(self._complete_checkpoints() if self.rank == 0 else None)
        if not candidates:
            return False
        tag, state = candidates[0]
        self._check_resumable(tag, state)
        if state["step"] == self.step and self._last_saved_step == self.step:
            return True  # this very object wrote it: already in that state
        if self._any_rank(not (self.checkpoint_dir / tag).is_dir()):
            raise CheckpointMismatchError(
                f"checkpoint {self.checkpoint_dir / tag} exists on rank 0 but not on every rank: put checkpoints/ "
                f"on a filesystem all nodes share, or delete {self.checkpoint_dir} to start over")
        for tag, state in candidates:
            self._check_resumable(tag, state)
            try:
                client_state = self._load_tag(tag)
            except UnreadableCheckpointError as e:
                bad = e
            else:
                bad = None
            if self._any_rank(bad is not None):
                if self.rank == 0 or bad is not None:
                    print(f"warning: checkpoint {self.checkpoint_dir / tag} is unreadable "
                          f"({bad if bad else 'on another rank'}); trying the previous one", file=sys.stderr)
                continue
            self.ema.load_state_dict(client_state["ema"])
            self.step = int(client_state["step"])
            self.last_loss = float(client_state.get("last_loss", float("nan")))
            rng_path = self.checkpoint_dir / tag / f"rng_rank{self.rank}.pt"
            if rng_path.is_file():  # absent when this rank did not exist in the run that saved it
                rng = safe_torch_load(str(rng_path))
                torch.set_rng_state(rng["cpu"])
                if torch.cuda.is_available() and "cuda" in rng:
                    torch.cuda.set_rng_state(rng["cuda"])
            self._last_saved_step = self.step
            return True
        raise CheckpointMismatchError(
            f"no checkpoint in {self.checkpoint_dir} is readable (see the warnings above); delete "
            f"{self.checkpoint_dir} to train from scratch")

    def _load_tag(self, tag: str) -> dict[str, Any]:
        _, client_state = self.engine.load_checkpoint(
            str(self.checkpoint_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if client_state is None or "ema" not in client_state:
            raise UnreadableCheckpointError(str(self.checkpoint_dir / tag), "no model state in it")
        return client_state

    def _parameters_finite(self) -> bool:
        with torch.no_grad():
            return all(bool(torch.isfinite(p).all()) for p in self.engine.module.parameters())

    def save_checkpoint(self) -> Path:
        """Save engine, EMA, step, fingerprint and RNG at the current step (call on every rank)."""
        if not self._parameters_finite():
            raise NonFiniteLossError(
                f"weights became non-finite by step {self.step}; not checkpointed, the last good checkpoint "
                f"({self._last_saved_step}) is kept",
                self.step,
            )
        tag = f"step{self.step:08d}"
        client_state = {"ema": self.ema.state_dict(), "step": self.step, "fingerprint": self.fingerprint,
                        "last_loss": self.last_loss}
        # save_latest=False: our own pointer is written only once every file of the tag exists.
        self.engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, client_state=client_state, save_latest=False)
        tag_dir = self.checkpoint_dir / tag
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, tag_dir / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            state = {"step": self.step, "fingerprint": self.fingerprint, "last_loss": self.last_loss}
            _write_text_atomic(tag_dir / _STATE_FILE, json.dumps(state, indent=1, allow_nan=True))
        _barrier()
        if self.rank == 0:
            _write_text_atomic(self.checkpoint_dir / _LATEST_FILE, tag)
            self._prune_checkpoints(keep=tag)
        _barrier()
        self._last_saved_step = self.step
        return tag_dir

    def _prune_checkpoints(self, keep: str) -> None:
        tags = sorted(p.name for p in self.checkpoint_dir.glob("step*") if p.is_dir())
        stale = [t for t in tags if t != keep][: max(0, len(tags) - self.config.keep_checkpoints)]
        for tag in stale:
            shutil.rmtree(self.checkpoint_dir / tag, ignore_errors=True)

    # ------------------------------------------------------------------ training

    def _to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        device = self.engine.device
        moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        x = moved.get("x")
        if x is None or not torch.is_tensor(x):
            raise ValueError(f"each batch needs a tensor under key 'x', got keys={sorted(batch)}")
        if x.shape[0] != self.micro_batch_size:
            raise ValueError(
                f"batch has {x.shape[0]} rows but the micro-batch size is {self.micro_batch_size} "
                f"(batch_size={self.config.batch_size} / (world_size={self.world_size} x "
                f"grad_accum={self.config.grad_accum}))"
            )
        return moved

    def _global_loss(self, loss: torch.Tensor) -> float:
        """Loss averaged over ranks (so every rank agrees on finiteness and stops together)."""
        value = loss.detach().float()
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world_size
        return float(value)

    def fit(self, batches: Iterable[Mapping[str, Any]], skip_consumed_batches: bool = True) -> TrainResult:
        """Train until ``config.steps`` optimizer steps, resuming from ``checkpoint_dir`` if it has a checkpoint.

        Each item of ``batches`` is one micro-batch dict ({"x", "y"}) for this rank. When resuming and
        ``skip_consumed_batches`` is true, the first ``step * grad_accum`` items are skipped, which makes a
        resumed run identical to an uninterrupted one when ``batches`` replays the same stream from its start.
        Raises NonFiniteLossError (naming the step) on a NaN/inf loss; nothing is saved for that step.
        """
        resumed = self._resume()
        history: list[dict[str, float]] = []
        if self.step >= self.config.steps:
            return TrainResult(self.step, self.last_loss, history)

        iterator = iter(batches)
        if resumed and skip_consumed_batches:
            for _ in range(self.step * self.config.grad_accum):
                if next(iterator, None) is None:
                    raise ValueError(f"batches ran out while skipping the {self.step} already trained steps")

        accum = self.config.grad_accum
        window_loss, window_micro, window_steps = 0.0, 0, 0
        window_metrics: dict[str, float] = {}
        window_start = time.perf_counter()
        micro_in_step = 0
        lr_of_this_step = float("nan")
        grad_norm: torch.Tensor | float | None = None
        # Redrawn 10x/s on a terminal; when stderr is a pipe (a stage under `dvc repro` / the pipeline flow, whose
        # logger turns every redraw into a log line) every 10 s.
        progress = tqdm(total=self.config.steps, initial=self.step, desc="train", dynamic_ncols=True,
                        mininterval=0.1 if sys.stderr.isatty() else 10.0,
                        disable=self.rank != 0 or not self.config.progress_bar)
        try:
            for batch in iterator:
                batch = self._to_device(batch)
                loss, metrics = self.loss_fn(self.engine, batch)
                loss_value = self._global_loss(loss)
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(
                        f"non-finite loss {loss_value} at step {self.step + 1}; stopped, the last good "
                        f"checkpoint (step {self._last_saved_step}) is kept in {self.checkpoint_dir}",
                        self.step + 1,
                    )
                self.engine.backward(loss)
                at_boundary = micro_in_step + 1 == accum
                if at_boundary:
                    lr_of_this_step = self.engine.get_lr()[0]
                    if self._trainer_clips and self.config.grad_clip > 0:
                        grad_norm = torch.nn.utils.clip_grad_norm_(self.engine.module.parameters(),
                                                                   self.config.grad_clip)
                self.engine.step()
                window_loss += loss_value
                window_micro += 1
                for key, value in metrics.items():
                    window_metrics[key] = window_metrics.get(key, 0.0) + float(value)
                micro_in_step += 1
                if micro_in_step < accum:
                    continue
                micro_in_step = 0
                self.step += 1
                window_steps += 1
                self.last_loss = loss_value
                self.ema.update(self.engine.module, self.step)
                progress.update(1)

                if self.step % self.config.log_every == 0 or self.step == self.config.steps:
                    elapsed = time.perf_counter() - window_start
                    logged = {"loss": window_loss / window_micro, "lr": float(lr_of_this_step),
                              "steps_per_sec": window_steps / max(elapsed, 1e-9)}
                    if not self._trainer_clips:
                        grad_norm = self.engine.get_global_grad_norm()
                    if grad_norm is not None:
                        logged["grad_norm"] = float(grad_norm)  # pre-clipping norm of the last step
                    logged.update({k: v / window_micro for k, v in window_metrics.items()})
                    history.append({"step": float(self.step), **logged})
                    if self.rank == 0:
                        progress.set_postfix(loss=f"{logged['loss']:.4g}", refresh=False)
                        if self.log_fn is not None:
                            self.log_fn(logged, self.step)
                    window_loss, window_micro, window_steps = 0.0, 0, 0
                    window_metrics = {}
                    window_start = time.perf_counter()

                if self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
                    self.save_checkpoint()
                if self.step >= self.config.steps:
                    break
        finally:
            progress.close()

        if self.step < self.config.steps:
            if self.step > 0 and self._last_saved_step != self.step:
                self.save_checkpoint()  # keep the progress so a longer stream can resume from here
            raise ValueError(
                f"batches ran out after {self.step} optimizer steps; config.steps={self.config.steps} "
                f"needs {self.config.steps * accum} micro-batches per rank"
            )
        if self._last_saved_step != self.step:
            self.save_checkpoint()
        return TrainResult(self.step, self.last_loss, history)

    # ------------------------------------------------------------------ export

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA weights as a plain state dict (float32, CPU) for the bare model."""
        return self.ema.state_dict()

    def export(self, path: Path | str) -> Path:
        """Write the EMA weights with ``torch.save`` (rank 0 only, atomically); loads with no DeepSpeed."""
        path = Path(path)
        if self.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            torch.save(self.ema_state_dict(), tmp)
            os.replace(tmp, path)
        _barrier()
        return path


__all__ = [
    "CheckpointMismatchError",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "UnreadableCheckpointError",
    "build_deepspeed_config",
    "build_optimizer",
    "safe_torch_load",
]
