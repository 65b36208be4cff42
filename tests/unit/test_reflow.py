"""Reflow objectives, coupling diagnostics and coupling generation against closed forms
(reference/algorithms-training.md section 4 and section 7 item 5)."""
import json
import math
from pathlib import Path

import pytest
import torch

from components.diffusion.grids import make_grid
from components.diffusion.oracles import GaussianData
from components.diffusion.samplers import sample
from components.diffusion.schedules import make_schedule
from components.errors import DataError
from components.evaluation.metrics import straightness
from components.models.store import LoadedModel, build_denoiser, load_denoiser
from components.objectives.reflow import (EulerDistillObjective, ReflowObjective, coupling_diagnostics,
                                          reflow_loss, transport_cost)
from components.training.reflow_training import (generate_couplings, read_couplings, student_spec,
                                                 write_coupling_shards)

MU, STD = torch.tensor([2.0, -1.0], dtype=torch.float64), 0.5
FLOW = make_schedule("flow")


def _velocity_model(velocity):
    """A stand-in 'model' with the Denoiser call signature that returns a given velocity field."""
    def model(x, t, cond=None, target="v"):
        assert target == "v"
        return velocity(x, t)
    return model


def _teacher_coupling(n=2000, steps=48):
    """z -> x by integrating the exact Gaussian teacher (independent-coupling marginal velocity) with Heun."""
    data = GaussianData(MU, STD)
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = sample(data.denoiser(FLOW), FLOW, make_grid("uniform", FLOW, steps), z, method="heun")
    return data, z, result.x


def _rectified_velocity(y, t):
    """Exact velocity of the affine coupling x = MU + STD z on x_t = (1 - t) x + t z: invert y -> z, return z - x."""
    t = t.to(torch.float64)[:, None]
    z = (y - (1 - t) * MU) / ((1 - t) * STD + t)
    return z - (MU + STD * z)


def test_gaussian_teacher_coupling_is_the_affine_map_and_no_costlier_than_independent():
    data, z, x = _teacher_coupling()
    # Gaussian -> Gaussian: the PF-ODE map is affine, x = mu + s z (section 7 item 3).
    assert torch.allclose(x, MU + STD * z, atol=5e-3)  # Heun error at 48 steps (last step Euler)
    independent_x = data.means[0] + STD * torch.randn(len(z), 2, generator=torch.Generator().manual_seed(1),
                                                      dtype=torch.float64)
    cost, independent = transport_cost(z, x), transport_cost(z, independent_x)
    # Closed forms: ||mu||^2 + d (1 - s)^2 = 5.5 for the rectified map, ||mu||^2 + d (1 + s^2) = 7.5 independent.
    assert cost == pytest.approx(5.5, rel=0.05) and independent == pytest.approx(7.5, rel=0.05)
    assert cost <= independent  # Prop 5.4.1


def test_one_reflow_with_the_exact_velocity_is_straight_while_the_teacher_is_not():
    data, z, x = _teacher_coupling(n=500)
    grid = make_grid("uniform", FLOW, 32)
    # The teacher's own ODE paths (independent coupling) curve: sd(t) = sqrt((1-t)^2 s^2 + t^2) is not linear.
    teacher_path = sample(data.denoiser(FLOW), FLOW, grid, z, method="euler", return_trajectory=True)
    # The reflowed field, on the coupling (z, x): Euler paths from z with the exact velocity of that coupling.
    states, state = [z], z
    for t, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        state = state + (t_next - t) * _rectified_velocity(state, torch.full((len(z),), t, dtype=torch.float64))
        states.append(state)
    s_teacher = straightness(teacher_path.trajectory, grid)
    s_reflow = straightness(states, grid)
    assert s_teacher > 0.01
    assert s_reflow < 1e-6 * s_teacher
    assert torch.allclose(states[-1], x, atol=5e-3)  # the straight paths reproduce the coupling
    # Its reflow loss is ~0; the teacher velocity on the same coupling is not the reflow minimiser.
    teacher_v = lambda y, t: data.predict(y, t, FLOW, "v")  # noqa: E731
    assert reflow_loss(_rectified_velocity, z, x) < 1e-6
    assert reflow_loss(teacher_v, z, x) > 1e-3


def test_reflow_objective_uses_the_project_time_convention():
    _, z, x = _teacher_coupling(n=256)
    objective = ReflowObjective()
    loss, metrics = objective(_velocity_model(_rectified_velocity), {"x": x, "z": z, "y": None})
    assert float(loss) < 1e-6 and metrics["loss"] == pytest.approx(float(loss))
    # With v = 0 the loss is exactly the per-element transport cost, ||z - x||^2 / D.
    zero, _ = objective(_velocity_model(lambda y, t: torch.zeros_like(y)), {"x": x, "z": z, "y": None})
    assert float(zero) == pytest.approx(transport_cost(z, x) / 2, rel=1e-9)
    # The opposite sign (target x - z) would be far off.
    flipped, _ = objective(_velocity_model(lambda y, t: -_rectified_velocity(y, t)), {"x": x, "z": z, "y": None})
    assert float(flipped) > 1.0


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_euler_distill_objective_is_zero_for_the_exact_straight_field(steps):
    _, z, x = _teacher_coupling(n=128)
    objective = EulerDistillObjective(steps)
    # The affine coupling's rectified field is straight, so Euler is exact at any step count.
    exact, _ = objective(_velocity_model(_rectified_velocity), {"x": x, "z": z})
    wrong, _ = objective(_velocity_model(lambda y, t: torch.zeros_like(y)), {"x": x, "z": z})
    assert float(exact) < 1e-5
    assert float(wrong) == pytest.approx(transport_cost(z, x) / 2, rel=1e-9)


def test_euler_distill_objective_unrolls_the_same_steps_as_the_euler_sampler(tmp_path):
    """The distilled student is sampled with Euler on the uniform grid: the objective must unroll exactly those
    steps, so a coupling made by the model's own n-step Euler sampler has zero loss at n steps and not at n + 1."""
    torch.manual_seed(0)
    spec = _tiny_spec()
    # random weights everywhere (a fresh network's zero-initialised output layer would make every field zero)
    state = {k: torch.randn_like(v) * 0.5 for k, v in build_denoiser(spec).state_dict().items()}
    model = _loaded(spec, state, tmp_path)
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(2))
    x = model.sample(z, steps=2, method="euler", grid="uniform").x
    with torch.no_grad():
        same, _ = EulerDistillObjective(2)(model.denoiser, {"x": x, "z": z})
        other, _ = EulerDistillObjective(3)(model.denoiser, {"x": x, "z": z})
    assert float(same) < 1e-10 and float(other) > 1e-6
    with pytest.raises(ValueError, match="steps >= 1"):
        EulerDistillObjective(0)


def test_rotation_coupling_has_zero_reflow_loss_but_is_never_reported_optimal():
    angle = 2 * math.pi / 3
    rotation = rotation_matrix(angle)
    z = torch.randn(512, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = z @ rotation.T
    velocity = rotation_velocity(rotation)
    loss, _ = ReflowObjective()(_velocity_model(velocity), {"x": x, "z": z})
    assert float(loss) < 1e-20  # a fixed point of reflow: the straight paths never cross
    report = coupling_diagnostics(z, x, velocity)
    assert report["reflow_loss"] < 1e-20 and report["fixed_point"] is True
    # Cost E||Az - z||^2 = 2 d - 2 tr A = 4 (1 - cos angle) = 6, while N(0, I) -> N(0, I) has OT cost 0.
    assert report["transport_cost"] == pytest.approx(4 * (1 - math.cos(angle)), rel=0.1)
    assert report["assignment_cost"] < 0.2 * report["transport_cost"]
    assert report["optimal_transport"] is None
    assert "does not imply optimal transport" in report["note"]


@pytest.mark.parametrize("batch", [{"x": torch.zeros(4, 2)}, {"x": torch.zeros(4, 2), "z": torch.zeros(3, 2)}],
                         ids=["missing-z", "shape-mismatch"])
def test_reflow_objective_rejects_bad_batches(batch):
    with pytest.raises(ValueError, match="reflow batch"):
        ReflowObjective()(_velocity_model(lambda y, t: y), batch)


def _tiny_spec(objective="flow"):
    schedule, prediction = {"flow": ("flow", "v"), "edm": ("edm", "edm")}[objective]
    return {"network": {"kind": "mlp", "kwargs": {"data_dim": 2, "width": 16, "depth": 1, "embed_dim": 8,
                                                  "dropout": 0.0, "num_classes": None}},
            "schedule": {"name": schedule, "kwargs": {}}, "prediction": prediction, "sigma_data": 1.0,
            "data_shape": [2], "num_classes": None, "kind": "points", "objective": objective,
            "sampler": {"method": "heun", "grid": "uniform", "steps": 8, "guidance": 1.0}}


def test_student_spec_refuses_a_non_velocity_teacher_and_samples_with_euler():
    with pytest.raises(DataError, match="teacher.objective: flow"):
        student_spec(_tiny_spec("edm"))
    guided = _tiny_spec("flow")
    guided["sampler"]["guidance"] = 2.0
    spec = student_spec(guided, steps=2)
    assert spec["sampler"]["method"] == "euler" and spec["sampler"]["steps"] == 2
    assert spec["sampler"]["guidance"] == 1.0  # the couplings already carry the teacher's guidance
    assert spec["network"] == _tiny_spec()["network"] and spec["prediction"] == "v"


def test_couplings_resume_from_finished_chunks_and_round_trip_through_shards(tmp_path):
    torch.manual_seed(0)
    spec = _tiny_spec()
    model = _loaded(spec, build_denoiser(spec).state_dict(), tmp_path)
    z, x, y, reused = generate_couplings(model, 10, 4, nfe=4, solver="heun", seed=7, work_dir=tmp_path / "w",
                                         progress=False)
    assert reused == 0 and z.shape == x.shape == (10, 2) and y is None
    assert torch.allclose(x, model.sample(z, nfe=4, method="heun", grid="uniform").x)  # x is the ODE solution
    (tmp_path / "w" / "chunk000001.pt").unlink()  # as if killed before chunk 1 finished
    z2, x2, _, reused = generate_couplings(model, 10, 4, nfe=4, solver="heun", seed=7, work_dir=tmp_path / "w",
                                           progress=False)
    assert reused == 2 and torch.equal(z, z2) and torch.equal(x, x2)
    shards = write_coupling_shards(tmp_path, z, x, y, samples_per_shard=6, samples_per_record=4)
    assert shards == ["couplings-000000.tar", "couplings-000001.tar"]
    z3, x3, y3 = read_couplings(tmp_path)
    assert torch.equal(z3, z) and torch.equal(x3, x) and y3 is None
    with pytest.raises(DataError, match="couplings.count=3 is smaller than couplings.batch_size=4"):
        generate_couplings(model, 3, 4, nfe=4, solver="heun", seed=7, work_dir=tmp_path / "w", progress=False)


def test_couplings_split_over_two_ranks_equal_one_process(tmp_path):
    from components.training.distributed import launch_ranks

    torch.manual_seed(0)
    spec = _tiny_spec()
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    torch.save(build_denoiser(spec).state_dict(), model_dir / "model.pt")
    (model_dir / "model.json").write_text(json.dumps(spec))
    worker = Path(__file__).with_name("_couplings_worker.py")
    assert launch_ranks(2, [str(worker), str(model_dir), str(tmp_path / "w2"), str(tmp_path / "two.pt")]) == 0
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    model = load_denoiser(model_dir)
    z, x, _, _ = generate_couplings(model, 10, 4, nfe=4, solver="heun", seed=7, work_dir=tmp_path / "w1",
                                    progress=False)
    assert two["chunks"] == ["chunk000000.pt", "chunk000001.pt", "chunk000002.pt"]  # 2 by rank 0, 1 by rank 1
    assert torch.equal(two["z"], z)
    torch.testing.assert_close(two["x"], x, rtol=1e-5, atol=1e-6)  # float kernels may differ by thread count


def _loaded(spec, state, directory) -> LoadedModel:
    denoiser = build_denoiser(spec)
    denoiser.load_state_dict(state)
    return LoadedModel(denoiser.eval(), spec, directory)


def rotation_velocity(rotation: torch.Tensor):
    """Exact velocity of the coupling (z, x = A z) with A a rotation, on x_t = (1 - t) x + t z:
    v_t(y) = (I - A) ((1 - t) A + t I)^{-1} y (the notes' counterexample, in our time convention).

    A rotation without eigenvalue -1 keeps (1 - t) A + t I invertible on [0, 1], so the paths never cross and the
    reflow loss is exactly zero, although the coupling is not optimal transport (the OT map of N(0, I) to
    itself is the identity).
    """
    a = torch.as_tensor(rotation, dtype=torch.float64)
    eye = torch.eye(a.shape[0], dtype=torch.float64)

    def velocity(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t64 = t.to(torch.float64)[:, None, None]
        mats = (1 - t64) * a + t64 * eye  # [B, D, D]
        solved = torch.linalg.solve(mats, y.to(torch.float64).unsqueeze(-1)).squeeze(-1)
        return (solved @ (eye - a).T).to(y.dtype)

    return velocity


def rotation_matrix(angle: float) -> torch.Tensor:
    """2-D rotation by `angle` radians (float64)."""
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
