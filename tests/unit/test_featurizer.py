"""Reference classifier: learns a separable toy image task, deterministic, saves/loads, clear errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from components.evaluation.featurizer import (
    MissingDependencyError,
    extract_features,
    inception_fid,
    load_classifier,
    predict_labels,
    save_classifier,
    train_reference_classifier,
)

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


@pytest.fixture(scope="module")
def trained():
    images, labels = _stripes(256, seed=0)
    model = train_reference_classifier(images, labels, num_classes=2, steps=STEPS, batch_size=32, lr=3e-3, seed=0,
                                       width=8, feature_dim=16)
    return model, images, labels


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


def test_training_is_deterministic_given_seed(trained):
    model, images, labels = trained
    again = train_reference_classifier(images, labels, num_classes=2, steps=STEPS, batch_size=32, lr=3e-3, seed=0,
                                       width=8, feature_dim=16)
    for (name, p1), (_, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p1, p2), name


def test_three_channel_32px_input_runs():
    images, labels = _stripes(16, seed=2, channels=3, size=32)
    model = train_reference_classifier(images, labels, num_classes=2, steps=1, batch_size=8, seed=0, width=4,
                                       feature_dim=8)
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
    model, images, labels = trained
    with pytest.raises(ValueError, match="channels"):
        extract_features(model, images.repeat(1, 3, 1, 1))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        predict_labels(model, images[0])
    with pytest.raises(ValueError, match="labels"):
        train_reference_classifier(images, labels + 5, num_classes=2, steps=1)
    with pytest.raises(ValueError, match="height and width"):
        extract_features(model, torch.zeros(2, 1, 4, 4))


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