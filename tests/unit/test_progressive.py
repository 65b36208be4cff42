"""Progressive distillation: the closed-form two-step target (reference notes 5 and 9.2)."""
import pytest
import torch

from components.diffusion import Denoiser, GaussianData, make_grid, make_schedule, sample
from components.models import build_model
from components.objectives.progressive import (ProgressiveObjective, ddim_x0_step, implied_x0, snr_weight,
                                               two_step_target)


def random_teacher(schedule_name: str) -> Denoiser:
    torch.manual_seed(0)
    net = build_model("mlp", data_dim=2, width=32, depth=2, embed_dim=16, dropout=0.0, num_classes=None).double()
    with torch.no_grad():  # the output layer starts at zero: randomise every weight so the net is non-trivial
        for p in net.parameters():
            p.normal_(0.0, 0.5)
    return Denoiser(net, make_schedule(schedule_name), sigma_data=0.7, prediction="v").eval()


@pytest.mark.parametrize("schedule_name", ["flow", "vp_cosine"])
def test_one_ddim_step_with_target_lands_on_two_teacher_steps(schedule_name):
    teacher = random_teacher(schedule_name)
    schedule = teacher.schedule
    grid = make_grid("uniform", schedule, 8)
    x_s = torch.randn(64, 2, dtype=torch.float64)
    for k in (0, 2, 6):  # includes s = t_max (flow: alpha = 0) and t = 0 (sigma = 0)
        s, u, t = (grid[k + i].expand(64) for i in range(3))
        with torch.no_grad():
            target, x_t = two_step_target(teacher, schedule, x_s, s, u, t)
        a = [schedule.alpha(v) for v in (s, t)]
        g = [schedule.sigma(v) for v in (s, t)]
        one_step = ddim_x0_step(x_s, target, a[0], g[0], a[1], g[1])
        assert torch.allclose(one_step, x_t, atol=1e-12, rtol=0), (one_step - x_t).abs().max()
        # The teacher's own one-step x0 does not land there: the identity is not trivial.
        with torch.no_grad():
            naive = ddim_x0_step(x_s, teacher(x_s, s), a[0], g[0], a[1], g[1])
        assert (naive - x_t).abs().max() > 1e-4


def test_implied_x0_inverts_the_step():
    schedule = make_schedule("flow")
    s, t = torch.tensor([0.7]), torch.tensor([0.3])
    x_s, x0 = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    a_s, g_s, a_t, g_t = schedule.alpha(s), schedule.sigma(s), schedule.alpha(t), schedule.sigma(t)
    x_t = ddim_x0_step(x_s, x0, a_s, g_s, a_t, g_t)
    assert torch.allclose(implied_x0(x_s, x_t, a_s, g_s, a_t, g_t), x0, atol=1e-12)


def oracle_student(teacher, schedule, teacher_grid):
    """Returns the closed-form target at every even teacher grid time: the ideal student of the round."""
    def student(x, t, cond=None):
        k = torch.argmin((teacher_grid[None, :] - t[:, None].double()).abs(), dim=1)  # per-sample grid index
        s, u, t_next = (teacher_grid[k + i] for i in range(3))
        return two_step_target(teacher, schedule, x, s, u, t_next, cond)[0]
    return student


@pytest.mark.parametrize("data", ["random_net", "gaussian"])
def test_oracle_student_halves_the_steps_exactly(data):
    if data == "random_net":
        teacher = random_teacher("flow")
        schedule = teacher.schedule
    else:
        schedule = make_schedule("flow")
        teacher = GaussianData(torch.tensor([1.0, -2.0]), 0.5).denoiser(schedule)
    noise = torch.randn(128, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for n_student in (1, 2, 4):
            teacher_grid = make_grid("uniform", schedule, 2 * n_student)
            full = sample(teacher, schedule, teacher_grid, noise, method="ddim", return_trajectory=True)
            halved = sample(oracle_student(teacher, schedule, teacher_grid), schedule,
                            make_grid("uniform", schedule, n_student), noise, method="ddim", return_trajectory=True)
            assert halved.nfe == n_student and full.nfe == 2 * n_student
            for k, x in enumerate(halved.trajectory):  # every student state is the teacher's state at 2k
                assert torch.allclose(x, full.trajectory[2 * k], atol=1e-10, rtol=0)
            plain = sample(teacher, schedule, make_grid("uniform", schedule, n_student), noise, method="ddim")
            assert (plain.x - full.x).abs().max() > 1e-3  # the teacher itself at N/2 steps does not match


def test_objective_is_zero_for_the_oracle_and_positive_for_the_teacher():
    teacher = random_teacher("flow")
    schedule = teacher.schedule
    objective = ProgressiveObjective(teacher, schedule, student_steps=2)
    batch = {"x": torch.randn(256, 2, dtype=torch.float64), "y": None}
    oracle = oracle_student(teacher, schedule, objective.teacher_grid)
    torch.manual_seed(3)
    loss_oracle, _ = objective(oracle, batch)
    torch.manual_seed(3)
    loss_teacher, _ = objective(teacher, batch)
    assert float(loss_oracle) < 1e-20
    assert float(loss_teacher) > 1e-6


def test_weightings_closed_form():
    alpha, sigma = torch.tensor([0.0, 0.5, 0.9]), torch.tensor([1.0, 0.5, 0.1])
    snr = alpha**2 / sigma**2
    assert torch.allclose(snr_weight("truncated_snr", alpha, sigma), torch.tensor([1.0, 1.0, 81.0]))
    assert torch.allclose(snr_weight("snr_plus_one", alpha, sigma), snr + 1)
    assert torch.equal(snr_weight("constant", alpha, sigma), torch.ones(3))


def test_bad_input():
    teacher = random_teacher("flow")
    with pytest.raises(ValueError, match="student_steps"):
        ProgressiveObjective(teacher, teacher.schedule, student_steps=0)
    with pytest.raises(ValueError, match="weighting"):
        ProgressiveObjective(teacher, teacher.schedule, student_steps=2, weighting="snr")


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_first_round_distils_the_teacher_as_it_samples_guided_or_not(tmp_path, guidance):
    """A guided conditional teacher is distilled through its guided denoiser w D(c) + (1 - w) D(null) (the students
    then sample unguided); an unguided one through its plain denoiser."""
    from components.config import DataParams, TrainConfig
    from components.data.shards import write_shards
    from components.data.sources import load_source
    from components.io import write_json
    from components.models.store import build_denoiser, save_denoiser
    from components.training.distillation import default_guidance, progressive_round_task

    spec = {"network": {"kind": "mlp", "kwargs": {"data_dim": 2, "width": 16, "depth": 1, "embed_dim": 8,
                                                  "dropout": 0.0, "num_classes": 3}},
            "schedule": {"name": "flow", "kwargs": {}}, "prediction": "v", "sigma_data": 1.0, "data_shape": [2],
            "num_classes": 3, "kind": "points", "objective": "flow",
            "sampler": {"method": "heun", "grid": "uniform", "steps": 8, "guidance": guidance}}
    denoiser = build_denoiser(spec)
    torch.manual_seed(0)
    denoiser.load_state_dict({k: torch.randn_like(v) for k, v in denoiser.state_dict().items()})
    save_denoiser(tmp_path / "teacher", denoiser.state_dict(), spec)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_json(shards / "manifest.json", write_shards(load_source(DataParams(n_samples=40)), shards, val_fraction=0.25,
                                                      samples_per_shard=100, min_shards=1, seed=0, progress=False))
    w = default_guidance(spec)
    task = progressive_round_task({"spec": spec, "init": str(tmp_path / "teacher"), "guidance": w, "student_steps": 4,
                                   "weighting": "constant", "shards": str(shards)}, TrainConfig(batch_size=8), 1)
    distilled = task.loss_fn.teacher
    x, t, c = torch.randn(5, 2), torch.full((5,), 0.4), torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        expected = guidance * denoiser(x, t, c) + (1 - guidance) * denoiser(x, t, torch.full_like(c, 3))
        assert w == guidance
        assert torch.allclose(distilled(x, t, c), expected, atol=1e-6)
        assert torch.equal(task.model(x, t, c), denoiser(x, t, c))  # the student starts from the teacher
