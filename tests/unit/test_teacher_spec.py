"""Model spec from params + shard manifest: the right network for the data, clear errors otherwise."""
import pytest

from components.config import ModelParams, TeacherParams, UNetParams
from components.errors import DataError
from components.models.store import build_denoiser
from components.training.denoiser_training import teacher_spec
from components.training.recipe import fingerprint

POINTS = {"shape": [2], "kind": "points", "num_classes": 8, "sigma_data": 1.1}
IMAGES = {"shape": [1, 8, 8], "kind": "image", "num_classes": 10, "sigma_data": 0.6}


@pytest.mark.parametrize("objective, schedule, prediction, grid", [
    ("edm", "edm", "edm", "edm"), ("eps", "vp_cosine", "eps", "logsnr"), ("flow", "flow", "v", "uniform")])
def test_objective_decides_schedule_prediction_and_grid(objective, schedule, prediction, grid):
    spec = teacher_spec(POINTS, ModelParams(), TeacherParams(objective=objective))
    assert (spec["schedule"]["name"], spec["prediction"], spec["sampler"]["grid"]) == (schedule, prediction, grid)
    assert spec["network"]["kind"] == "mlp" and spec["num_classes"] is None
    build_denoiser(spec)


def test_conditional_unet_for_images():
    spec = teacher_spec(IMAGES, ModelParams(), TeacherParams(conditional=True))
    assert spec["network"]["kind"] == "unet"
    assert spec["network"]["kwargs"]["image_size"] == 8 and spec["num_classes"] == 10
    build_denoiser(spec)


def test_image_size_that_does_not_fit_the_unet_names_both():
    model = ModelParams(unet=UNetParams(channel_mult=(1, 2, 2, 2)))
    with pytest.raises(DataError, match=r"image size 12x12 .* multiple of 8"):
        teacher_spec({**IMAGES, "shape": [1, 12, 12]}, model, TeacherParams())


def test_conditional_without_labels_is_an_error():
    with pytest.raises(DataError, match="no class labels"):
        teacher_spec({**POINTS, "num_classes": None}, ModelParams(), TeacherParams(conditional=True))


def test_fingerprint_changes_with_inputs():
    assert fingerprint({"a": 1}) == fingerprint({"a": 1}) != fingerprint({"a": 2})
