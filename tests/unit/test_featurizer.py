"""Reference classifier: trained by the one Trainer with its cross-entropy loss it learns a separable toy image task,
deterministically; saves/loads; clear errors for images it cannot take."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from components.config import TrainConfig
from components.data.memory import shuffled_batches
from components.errors import DataError
from components.evaluation.featurizer import (
    WEIGHTS_FILENAME,
    ClassifierConfig,
    MissingDependencyError,
    ReferenceClassifier,
    classifier_config,
    extract_features,
    inception_fid,
    load_classifier,
    predict_labels,
    save_classifier,
    save_classifier_config,
)
from components.training.classifier_training import classifier_loss
from components.training.recipe import TrainingTask, train

STEPS = 40


def _stripes(n: int, seed: int, channels: int = 1, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: horizontal stripes, class 1: vertical stripes, plus noise; values roughly in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=generator)
    pattern = (torch.arange(size) % 2).float() * 2 - 1
    horizontal = pattern[:, None].expand(size, size)
    images = torch.where(labels[:, None, None] == 0, horizontal, horizontal.T)[:, None].repeat(1, channels, 1, 1)
    images = images + 0.5 * torch.randn(images.shape, generator=generator)
    return images, labels


def train_classifier(images: torch.Tensor, labels: torch.Tensor, directory, seed: int = 0) -> ReferenceClassifier:
    """The featurizer stage's training (classifier_loss through the recipe's `train`: the one Trainer), on images in
    memory."""
    config = ClassifierConfig(images.shape[1], num_classes=2, width=8, feature_dim=16)
    torch.manual_seed(seed)
    task = TrainingTask(ReferenceClassifier(config), classifier_loss,
                        shuffled_batches({"x": images, "y": labels}, 32, seed), fingerprint={})
    train(task, TrainConfig(steps=STEPS, batch_size=32, lr=3e-3, ema_decay=0.0, seed=seed, progress_bar=False),
          directory / "checkpoints", directory / WEIGHTS_FILENAME)
    save_classifier_config(config, directory)
    return load_classifier(directory)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    images, labels = _stripes(256, seed=0)
    return train_classifier(images, labels, tmp_path_factory.mktemp("classifier")), images, labels


def test_classifier_learns_separable_stripes(trained):
    model, _, _ = trained
    test_images, test_labels = _stripes(200, seed=1)
    accuracy = (predict_labels(model, test_images) == test_labels).float().mean().item()
    assert accuracy > 0.95


def test_features_are_penultimate_and_shaped(trained):
    model, images, _ = trained
    features = extract_features(model, images[:10], batch_size=3)
    assert features.shape == (10, 16)
    # The head applied to the features reproduces the predicted labels.
    assert torch.equal(model.head(features).argmax(1), predict_labels(model, images[:10]))


def test_training_is_deterministic_given_seed(trained, tmp_path):
    model, images, labels = trained
    again = train_classifier(images, labels, tmp_path)
    for (name, p1), (_, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p1, p2), name


def test_three_channel_32px_input_runs():
    images, _ = _stripes(16, seed=2, channels=3, size=32)
    model = ReferenceClassifier(ClassifierConfig(3, 2, width=4, feature_dim=8))
    assert extract_features(model, images).shape == (16, 8)


def test_save_load_round_trip(trained, tmp_path):
    model, images, _ = trained
    save_classifier(model, tmp_path / "ref")
    loaded = load_classifier(tmp_path / "ref")
    assert loaded.config == model.config
    assert torch.equal(extract_features(loaded, images[:20]), extract_features(model, images[:20]))
    (tmp_path / "ref" / "classifier.pt").unlink()
    with pytest.raises(FileNotFoundError, match="classifier.pt"):
        load_classifier(tmp_path / "ref")


def test_bad_inputs_raise_clear_errors(trained):
    model, images, _ = trained
    with pytest.raises(ValueError, match="channels"):
        extract_features(model, images.repeat(1, 3, 1, 1))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        predict_labels(model, images[0])
    with pytest.raises(ValueError, match="height and width"):
        extract_features(model, torch.zeros(2, 1, 4, 4))


def test_shards_the_classifier_cannot_learn_are_data_errors():
    assert classifier_config({"shape": [3, 32, 32], "num_classes": 10}) == ClassifierConfig(3, 10)
    with pytest.raises(DataError, match="class labels"):
        classifier_config({"shape": [1, 8, 8], "num_classes": None})
    with pytest.raises(DataError, match=r"\[3, 64, 64\]"):
        classifier_config({"shape": [3, 64, 64], "num_classes": 10})


def test_inception_fid_missing_weights_file(tmp_path):
    images = torch.zeros(4, 1, 8, 8)
    with pytest.raises(FileNotFoundError, match="inception_weights"):
        inception_fid(images, images, tmp_path / "missing.pth")


@pytest.mark.skipif(importlib.util.find_spec("torchmetrics") is not None, reason="torchmetrics is installed")
def test_inception_fid_names_missing_package(tmp_path):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"not used")
    images = torch.zeros(4, 1, 8, 8)
    with pytest.raises(MissingDependencyError, match="torchmetrics"):
        inception_fid(images, images, weights)


def test_image_reference_reports_class_accuracy_of_labelled_samples_only(trained):
    from components.evaluation.protocol import image_reference

    model, images, labels = trained
    reference = image_reference("stripes", model, images[:100], images[100:200], 60, log=lambda _: None)
    samples, sample_labels = _stripes(60, seed=3)
    null = torch.full((10,), 2)  # label num_classes = "no label": excluded from the accuracy
    scores = reference.score(samples, torch.cat([sample_labels[:50], null]))
    assert scores["class_accuracy"] == 1.0
    assert scores["fd_ratio"] == pytest.approx(scores["fd"] / reference.floors["fd"].mean)
    assert 0.0 <= scores["precision"] <= 1.0 and 0.0 <= scores["recall"] <= 1.0
    flipped = reference.score(samples, torch.cat([1 - sample_labels[:50], null]))
    assert flipped["class_accuracy"] == 0.0
    assert "class_accuracy" not in reference.score(samples, None)