"""The DeepSpeed Trainer on CPU with a real engine: learning, EMA formula, exact resume, errors, export, 2 ranks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from components.models import build_model
from components.training import (
    CheckpointMismatchError,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    build_deepspeed_config,
    launch_ranks,
)

TRUE_WEIGHTS = torch.tensor([[1.5], [-2.0]])


def _regressor(seed: int = 0, hidden: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 1))


def _stream(micro_batch: int, seed: int = 1, crash_after: int | None = None) -> Iterator[dict]:
    """Deterministic regression batches; optionally raise after `crash_after` items (a simulated crash)."""
    generator = torch.Generator().manual_seed(seed)
    produced = 0
    while True:
        if crash_after is not None and produced == crash_after:
            raise RuntimeError("simulated crash")
        x = torch.randn(micro_batch, 2, generator=generator)
        produced += 1
        yield {"x": x, "y": None, "target": x @ TRUE_WEIGHTS}


def _noisy_loss(engine, batch):
    # Noise from the global RNG: an exact resume must restore the RNG state as well as the weights.
    noise = 0.05 * torch.randn_like(batch["target"])
    loss = ((engine(batch["x"]) - batch["target"] - noise) ** 2).mean()
    return loss, {"target_std": float(batch["target"].std())}


def _config(**overrides) -> TrainConfig:
    base = dict(steps=12, batch_size=8, lr=1e-2, ema_decay=0.8, log_every=4, progress_bar=False)
    base.update(overrides)
    return TrainConfig(**base)


def _flat(module_or_state) -> torch.Tensor:
    tensors = module_or_state.values() if isinstance(module_or_state, dict) else module_or_state.state_dict().values()
    return torch.cat([t.detach().float().flatten() for t in tensors])


def test_loss_decreases_lr_warmup_and_log_fn(tmp_path: Path) -> None:
    logged: list[tuple[int, dict]] = []
    config = _config(steps=80, lr=2e-2, warmup_steps=4, log_every=1)
    trainer = Trainer(_regressor(), _noisy_loss, config, tmp_path, log_fn=lambda m, s: logged.append((s, m)))
    result = trainer.fit(_stream(8))
    assert result.steps == 80 and [s for s, _ in logged] == list(range(1, 81))
    losses = [m["loss"] for _, m in logged]
    assert sum(losses[-10:]) / 10 < 0.1 * sum(losses[:5]) / 5
    # DeepSpeed WarmupLR (linear): lr after optimizer step s is lr * min(1, s / warmup_steps).
    lrs = [m["lr"] for _, m in logged[:6]]
    assert lrs == pytest.approx([2e-2 * min(1.0, s / 4) for s in range(1, 7)])
    assert {"loss", "lr", "steps_per_sec", "target_std"} <= set(logged[0][1])


def test_ema_follows_formula_and_differs_from_raw_weights(tmp_path: Path) -> None:
    decay = 0.7
    seen: list[torch.Tensor] = []

    def recording_loss(engine, batch):
        seen.append(_flat(engine.module).clone())  # weights after the previous optimizer step
        return _noisy_loss(engine, batch)

    trainer = Trainer(_regressor(), recording_loss, _config(steps=6, ema_decay=decay), tmp_path)
    trainer.fit(_stream(8))
    weights_after_each_step = seen[1:] + [_flat(trainer.model)]
    expected = seen[0]
    for step, weights in enumerate(weights_after_each_step, start=1):
        d = min(decay, (1 + step) / (10 + step))  # warmup: 0.18, 0.25, ... then capped at decay
        expected = d * expected + (1 - d) * weights
    ema = _flat(trainer.ema_state_dict())
    torch.testing.assert_close(ema, expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(ema, _flat(trainer.model), atol=1e-4)
    assert not any(t.requires_grad for t in trainer.ema.shadow.values())


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_resume_after_crash_matches_uninterrupted_run(tmp_path: Path, zero_stage: int) -> None:
    config = _config(steps=10, checkpoint_every=4, zero_stage=zero_stage, grad_accum=2)
    micro = config.micro_batch_size(1)
    reference = Trainer(_regressor(), _noisy_loss, config, tmp_path / "uninterrupted")
    reference.fit(_stream(micro))

    crashing = Trainer(_regressor(), _noisy_loss, config, tmp_path / "resumed")
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.fit(_stream(micro, crash_after=6 * config.grad_accum + 1))  # dies during step 7
    assert (tmp_path / "resumed" / "latest").read_text() == "step00000004"

    calls: list[int] = []

    def counting_loss(engine, batch):
        calls.append(1)
        return _noisy_loss(engine, batch)

    # A fresh process would build a fresh model with other weights: the checkpoint must override them.
    resumed = Trainer(_regressor(seed=5), counting_loss, config, tmp_path / "resumed")
    result = resumed.fit(_stream(micro))
    assert result.steps == 10 and len(calls) == (10 - 4) * config.grad_accum
    torch.testing.assert_close(_flat(resumed.model), _flat(reference.model), rtol=0, atol=1e-7)
    torch.testing.assert_close(_flat(resumed.ema_state_dict()), _flat(reference.ema_state_dict()), rtol=0, atol=1e-7)
    # Rerunning a finished run trains nothing more.
    again = Trainer(_regressor(), counting_loss, config, tmp_path / "resumed").fit(_stream(micro))
    assert again.steps == 10 and len(calls) == 12


def test_fingerprint_or_architecture_mismatch_names_the_keys(tmp_path: Path) -> None:
    config = _config(steps=2)
    Trainer(_regressor(), _noisy_loss, config, tmp_path, fingerprint={"model": {"width": 16, "depth": 2}}).fit(_stream(8))
    other = Trainer(_regressor(), _noisy_loss, config, tmp_path, fingerprint={"model": {"width": 32, "depth": 2}})
    with pytest.raises(CheckpointMismatchError, match=r"differing keys: model\.width; delete .+ to train from scratch$"):
        other.fit(_stream(8))
    # Another architecture under the same user fingerprint: still a clear error, not a shape traceback.
    wider = Trainer(_regressor(hidden=32), _noisy_loss, config, tmp_path, fingerprint={"model": {"width": 16, "depth": 2}})
    with pytest.raises(CheckpointMismatchError, match=r"trainer\.parameter_shapes"):
        wider.fit(_stream(8))


def test_nan_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    calls: list[int] = []

    def loss_going_nan(engine, batch):
        calls.append(1)
        loss, metrics = _noisy_loss(engine, batch)
        return (loss * float("nan") if len(calls) == 7 else loss), metrics

    config = _config(steps=10, checkpoint_every=5)
    with pytest.raises(NonFiniteLossError, match=r"at step 7\b") as caught:
        Trainer(_regressor(), loss_going_nan, config, tmp_path).fit(_stream(8))
    assert caught.value.step == 7
    assert (tmp_path / "latest").read_text() == "step00000005"
    state = json.loads((tmp_path / "step00000005" / "trainer_state.json").read_text())
    assert state["step"] == 5
    saved = torch.load(tmp_path / "step00000005" / "mp_rank_00_model_states.pt", weights_only=False)
    assert all(torch.isfinite(t).all() for t in saved["module"].values())
    # The kept checkpoint resumes: training continues from step 5 to the end.
    result = Trainer(_regressor(), _noisy_loss, config, tmp_path).fit(_stream(8))
    assert result.steps == 10 and result.history[0]["step"] > 5


def test_batch_size_not_divisible_and_wrong_batch_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"batch_size=10 .*world_size=1 x grad_accum=4"):
        Trainer(_regressor(), _noisy_loss, _config(batch_size=10, grad_accum=4), tmp_path)
    with pytest.raises(ValueError, match=r"batch_size=8 .*world_size=3 x grad_accum=1 = 3"):
        _config(batch_size=8).micro_batch_size(world_size=3)
    trainer = Trainer(_regressor(), _noisy_loss, _config(batch_size=8, grad_accum=2), tmp_path)
    with pytest.raises(ValueError, match=r"batch has 8 rows but the micro-batch size is 4"):
        trainer.fit(_stream(8))
    with pytest.raises(ValueError, match=r"zero_stage"):
        _config(zero_stage=3)


def test_deepspeed_config_from_train_config() -> None:
    ds = build_deepspeed_config(_config(batch_size=64, grad_accum=2, warmup_steps=0, grad_clip=0.5), world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 4 == ds["train_batch_size"] == 64
    assert "optimizer" not in ds  # the engine gets build_optimizer's fused AdamW
    assert ds["gradient_clipping"] == 0.5 and "scheduler" not in ds
    if not torch.cuda.is_available():
        assert ds["bf16"]["enabled"] is False  # "auto" means fp32 on CPU


def test_export_loads_into_the_plain_model(tmp_path: Path) -> None:
    model_kwargs = dict(data_dim=2, width=16, depth=1, embed_dim=8, num_classes=2)

    def denoising_loss(engine, batch):
        x0 = batch["x"]
        sigma = torch.rand(x0.shape[0]) + 0.1
        noisy = x0 + sigma[:, None] * torch.randn_like(x0)
        return ((engine(noisy, sigma.log(), batch["y"]) - x0) ** 2).mean(), {}

    def labelled(micro):
        generator = torch.Generator().manual_seed(0)
        while True:
            yield {"x": torch.randn(micro, 2, generator=generator), "y": torch.randint(0, 2, (micro,), generator=generator)}

    torch.manual_seed(0)
    trainer = Trainer(build_model("mlp", **model_kwargs), denoising_loss, _config(steps=5, batch_size=16), tmp_path / "ckpt")
    trainer.fit(labelled(16))
    path = trainer.export(tmp_path / "export" / "ema.pt")
    plain = build_model("mlp", **model_kwargs)
    plain.load_state_dict(torch.load(path, weights_only=True), strict=True)
    torch.testing.assert_close(_flat(plain), _flat(trainer.ema_state_dict()), rtol=0, atol=0)
    assert plain.output_proj.weight.abs().sum() > 0  # it trained away from the zero init


def test_two_cpu_ranks_train_and_stay_in_sync(tmp_path: Path) -> None:
    worker = Path(__file__).with_name("_ddp_worker.py")
    exit_code = launch_ranks(2, [str(worker), str(tmp_path)])
    assert exit_code == 0
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in reports] == [2, 2] and [r["steps"] for r in reports] == [30, 30]
    assert reports[0]["params"] == reports[1]["params"]  # bitwise identical after 30 steps on different data
    assert reports[0]["ema"] == reports[1]["ema"]
    assert reports[0]["final_loss"] == reports[1]["final_loss"]  # the logged loss is the cross-rank mean
    assert reports[0]["final_loss"] < 0.5 * reports[0]["first_loss"]


def _deterministic_loss(engine, batch):
    return ((engine(batch["x"]) - batch["target"]) ** 2).mean(), {}


def test_grad_accumulation_equals_full_batch_and_grad_norm_is_exact(tmp_path: Path) -> None:
    full_batches = [next(_stream(8, seed=s)) for s in range(4)]
    halves = [h for b in full_batches for h in ({"x": b["x"][:4], "y": None, "target": b["target"][:4]},
                                                 {"x": b["x"][4:], "y": None, "target": b["target"][4:]})]
    # Closed form of the first step's gradient norm: autograd on a copy of the initial model.
    reference_model = _regressor()
    _deterministic_loss(reference_model, full_batches[0])[0].backward()
    first_grad_norm = torch.cat([p.grad.flatten() for p in reference_model.parameters()]).norm().item()

    logged: list[dict] = []
    config = _config(steps=4, grad_clip=1e-3, log_every=1)
    full = Trainer(_regressor(), _deterministic_loss, config, tmp_path / "full", log_fn=lambda m, s: logged.append(m))
    full.fit(full_batches)
    logged_accumulated: list[dict] = []
    accumulated = Trainer(_regressor(), _deterministic_loss, config.model_copy(update={"grad_accum": 2}),
                          tmp_path / "acc", log_fn=lambda m, s: logged_accumulated.append(m))
    accumulated.fit(halves)
    # Adam hides a wrong gradient scale in the weights, so compare the accumulated gradient itself.
    assert logged[0]["grad_norm"] == pytest.approx(first_grad_norm, rel=1e-5)
    assert logged_accumulated[0]["grad_norm"] == pytest.approx(first_grad_norm, rel=1e-5)
    assert first_grad_norm > 1e-3  # so clipping was active
    torch.testing.assert_close(_flat(accumulated.model), _flat(full.model), rtol=1e-5, atol=1e-6)
