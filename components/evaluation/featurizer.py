"""Reference featurizer for image evaluation: a small CNN classifier trained on the train split only (by the
featurizer stage, through the one training recipe: components/training/classifier_training.py).

Its penultimate activations are the feature space for Fréchet distance and k-NN precision/recall, and
its predictions give the class accuracy of conditional samples. It is saved as a versioned artifact
(state dict + JSON config) so every evaluation uses the same features.

Optional Inception-FID goes through torchmetrics (which needs torch-fidelity) with a local weights
file; nothing is downloaded and Inception is not re-implemented here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from components.errors import DataError

WEIGHTS_FILENAME = "classifier.pt"
CONFIG_FILENAME = "classifier.json"
MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 32


class MissingDependencyError(ImportError):
    """An optional package needed for a requested feature is not installed."""


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of the reference classifier (saved next to its weights)."""

    in_channels: int
    num_classes: int
    width: int = 32
    feature_dim: int = 128

    def __post_init__(self) -> None:
        for key in ("in_channels", "num_classes", "width", "feature_dim"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ClassifierConfig.{key} must be a positive int, got {value!r}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"ClassifierConfig.in_channels must be 1 or 3, got {self.in_channels}")
        if self.num_classes < 2:
            raise ValueError(f"ClassifierConfig.num_classes must be >= 2, got {self.num_classes}")


class ReferenceClassifier(nn.Module):
    """Three conv blocks (the last two stride 2), global average pooling, a feature layer, a linear head.

    Global pooling makes it size-agnostic between 8x8 and 32x32.
    """

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.conv = nn.Sequential(
            nn.Conv2d(config.in_channels, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
        )
        self.feature_layer = nn.Linear(2 * width, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features [B, feature_dim]."""
        pooled = self.conv(images).mean(dim=(2, 3))
        return F.silu(self.feature_layer(pooled))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits [B, num_classes]."""
        return self.head(self.features(images))


def _check_images(images: torch.Tensor, in_channels: int | None = None) -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.ndim != 4:
        raise ValueError(f"images: expected shape [N, C, H, W], got {tuple(images.shape)}")
    n, channels, height, width = images.shape
    if in_channels is not None and channels != in_channels:
        raise ValueError(f"images: expected {in_channels} channels, got {channels}")
    if channels not in (1, 3):
        raise ValueError(f"images: channels must be 1 or 3, got {channels}")
    if not (MIN_IMAGE_SIZE <= height <= MAX_IMAGE_SIZE and MIN_IMAGE_SIZE <= width <= MAX_IMAGE_SIZE):
        raise ValueError(f"images: height and width must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {height}x{width}")
    if n == 0:
        raise ValueError("images: got 0 images")
    return images.float()


def classifier_config(manifest: dict) -> ClassifierConfig:
    """The reference classifier for the images of a shard manifest; DataError when it cannot learn them (no class
    labels, or a shape it does not take)."""
    num_classes = manifest.get("num_classes")
    if not num_classes or num_classes < 2:
        raise DataError("featurizer: image data needs class labels (>= 2 classes) to train the reference "
                        "classifier; use an image_folder with class subfolders or an npz with labels")
    channels, height, width = manifest["shape"]
    if channels not in (1, 3) or not (MIN_IMAGE_SIZE <= min(height, width) and max(height, width) <= MAX_IMAGE_SIZE):
        raise DataError(f"featurizer: the reference classifier takes 1 or 3 channels of {MIN_IMAGE_SIZE}..."
                        f"{MAX_IMAGE_SIZE} pixels a side; the shards hold images of shape {list(manifest['shape'])}")
    return ClassifierConfig(channels, num_classes)


@torch.no_grad()
def extract_features(model: ReferenceClassifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Penultimate-layer features [N, feature_dim] (float32, CPU) in eval mode."""
    images = _check_images(images, model.config.in_channels)
    model.eval()
    return torch.cat([model.features(chunk).cpu() for chunk in images.split(batch_size)])


@torch.no_grad()
def predict_labels(model: ReferenceClassifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted class labels [N] (LongTensor)."""
    images = _check_images(images, model.config.in_channels)
    model.eval()
    return torch.cat([model(chunk).argmax(dim=1).cpu() for chunk in images.split(batch_size)])


def save_classifier(model: ReferenceClassifier, directory: str | Path) -> Path:
    """Write ``classifier.pt`` (state dict) and ``classifier.json`` (config) into directory; return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / WEIGHTS_FILENAME)
    return save_classifier_config(model.config, directory)


def save_classifier_config(config: ClassifierConfig, directory: str | Path) -> Path:
    """Write ``classifier.json`` next to weights written elsewhere (the training recipe exports ``classifier.pt``)."""
    directory = Path(directory)
    (directory / CONFIG_FILENAME).write_text(json.dumps(asdict(config), indent=2, sort_keys=True))
    return directory


def load_classifier(directory: str | Path) -> ReferenceClassifier:
    """Load a classifier written by ``save_classifier`` (eval mode, CPU)."""
    directory = Path(directory)
    for filename in (CONFIG_FILENAME, WEIGHTS_FILENAME):
        if not (directory / filename).is_file():
            raise FileNotFoundError(f"reference classifier: missing {directory / filename}")
    config = ClassifierConfig(**json.loads((directory / CONFIG_FILENAME).read_text()))
    model = ReferenceClassifier(config)
    model.load_state_dict(torch.load(directory / WEIGHTS_FILENAME, map_location="cpu", weights_only=True))
    return model.eval()


def _to_unit_rgb(images: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """Map images from value_range to [0, 1] and repeat grey to 3 channels (what Inception expects)."""
    low, high = value_range
    unit = ((torch.as_tensor(images).float() - low) / (high - low)).clamp(0.0, 1.0)
    return unit.repeat(1, 3, 1, 1) if unit.shape[1] == 1 else unit


def inception_fid(
    real_images: torch.Tensor,
    fake_images: torch.Tensor,
    weights_path: str | Path,
    value_range: tuple[float, float] = (-1.0, 1.0),
    batch_size: int = 64,
) -> float:
    """Inception-FID via torchmetrics' FrechetInceptionDistance with a local Inception weights file.

    Raises FileNotFoundError when the weights file is missing and MissingDependencyError when
    torchmetrics / torch-fidelity are not installed (neither is installed in the default environment).
    """
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise FileNotFoundError(f"evaluate.inception_weights: file not found: {weights_path}")
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as error:
        raise MissingDependencyError(
            "Inception-FID needs the packages 'torchmetrics' and 'torch-fidelity' (pip install torchmetrics torch-fidelity)"
        ) from error
    metric = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(weights_path))
    for images, is_real in ((real_images, True), (fake_images, False)):
        for chunk in _to_unit_rgb(images, value_range).split(batch_size):
            metric.update(chunk, real=is_real)
    return float(metric.compute())
