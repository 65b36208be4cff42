"""Networks: shape contract, zero-initialised output, conditioning (null label, label dropout), bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from components.models import MLP, FourierNoiseEmbedding, UNet, build_model

NUM_CLASSES = 3


def _small_unet(image_size: int, num_classes: int | None, **kwargs) -> nn.Module:
    levels = (1, 2) if image_size == 8 else (1, 2, 2)
    return build_model(
        "unet", image_size=image_size, in_channels=3, base_channels=8, channel_mult=levels,
        num_res_blocks=1, attention_resolutions=(4, 8), num_heads=2, num_classes=num_classes, **kwargs,
    )


def _perturb_output_layer(net: nn.Module) -> None:
    """Give the zero-initialised last layer random weights so the output depends on the inputs."""
    last = net.output_proj if isinstance(net, MLP) else net.conv_out
    with torch.no_grad():
        last.weight.normal_(0.0, 0.5)
        last.bias.normal_(0.0, 0.5)


def _nets() -> list:
    torch.manual_seed(0)
    cases = [
        ("mlp-uncond", build_model("mlp", data_dim=2, width=32, depth=2, embed_dim=16), (5, 2)),
        ("mlp-cond", build_model("mlp", data_dim=3, width=32, depth=2, num_classes=NUM_CLASSES), (5, 3)),
        ("unet8-uncond", _small_unet(8, None), (2, 3, 8, 8)),
        ("unet8-cond", _small_unet(8, NUM_CLASSES), (2, 3, 8, 8)),
        ("unet32-uncond", _small_unet(32, None), (2, 3, 32, 32)),
        ("unet32-cond", _small_unet(32, NUM_CLASSES), (2, 3, 32, 32)),
    ]
    return [pytest.param(*case, id=case[0]) for case in cases]


@pytest.mark.parametrize("name,net,shape", _nets())
def test_output_shaped_like_input_and_zero_at_init(name: str, net: nn.Module, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    c_noise = torch.randn(shape[0])
    cond = torch.randint(0, NUM_CLASSES + 1, (shape[0],)) if name.endswith("-cond") else None
    out = net(x, c_noise, cond)
    assert out.shape == x.shape and out.dtype == x.dtype
    # Zero-initialised last layer: the preconditioned denoiser starts exactly at c_skip * x.
    assert torch.equal(out, torch.zeros_like(x))


@pytest.mark.parametrize("name,net,shape", _nets())
def test_every_parameter_gets_a_gradient(name: str, net: nn.Module, shape: tuple[int, ...]) -> None:
    _perturb_output_layer(net)
    cond = torch.arange(shape[0]) % (NUM_CLASSES + 1) if name.endswith("-cond") else None
    net(torch.randn(shape), torch.randn(shape[0]), cond).square().sum().backward()
    without_grad = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without_grad == []


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_conditioning_null_label_and_label_dropout(kind: str) -> None:
    torch.manual_seed(1)
    net = (build_model("mlp", data_dim=2, width=32, depth=2, num_classes=NUM_CLASSES, label_dropout=1.0)
           if kind == "mlp" else _small_unet(8, NUM_CLASSES, label_dropout=1.0))
    _perturb_output_layer(net)
    net.eval()
    shape = (4, 2) if kind == "mlp" else (4, 3, 8, 8)
    x, c_noise = torch.randn(shape), torch.randn(4)
    labels = torch.tensor([0, 1, 2, 0])
    null = torch.full((4,), NUM_CLASSES)
    with torch.no_grad():
        labelled, unlabelled, as_null = net(x, c_noise, labels), net(x, c_noise, None), net(x, c_noise, null)
        other_noise = net(x, c_noise + 1.0, labels)
        net.train()  # label_dropout=1.0: every label becomes the null label in training mode
        dropped = net(x, c_noise, labels)
    assert torch.equal(unlabelled, as_null)  # cond=None means "no label"
    assert not torch.allclose(labelled, unlabelled)  # the label changes the output
    assert not torch.allclose(labelled, other_noise)  # so does the noise level
    torch.testing.assert_close(dropped, as_null)


def test_fourier_embedding_closed_form() -> None:
    embedding = FourierNoiseEmbedding(8, min_frequency=1.0, max_frequency=1000.0)
    c = torch.tensor([0.0, 0.3, -1.7])
    frequencies = torch.tensor([1.0, 10.0, 100.0, 1000.0])  # geometric from min to max, 4 = dim / 2
    expected = torch.cat([torch.cos(c[:, None] * frequencies), torch.sin(c[:, None] * frequencies)], dim=1)
    torch.testing.assert_close(embedding(c), expected, rtol=1e-5, atol=1e-4)
    assert math.isclose(float(embedding(c).square().sum(dim=1)[0]), 4.0, rel_tol=1e-6)  # cos^2+sin^2 per pair


def test_bf16_parameters_accept_float32_input() -> None:
    net = build_model("mlp", data_dim=2, width=16, depth=1).to(torch.bfloat16)
    _perturb_output_layer(net)
    out = net(torch.randn(3, 2), torch.rand(3))
    assert out.dtype == torch.float32 and out.shape == (3, 2) and torch.isfinite(out).all()


def test_unknown_kind_and_bad_image_sizes_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"kind='transformer'"):
        build_model("transformer")
    with pytest.raises(ValueError, match=r"image_size=12 .*multiple of 8"):
        build_model("unet", image_size=12, channel_mult=(1, 2, 2, 2))
    net = _small_unet(8, None)
    with pytest.raises(ValueError, match=r"16x16 .*image_size=8"):
        net(torch.randn(1, 3, 16, 16), torch.zeros(1))
    with pytest.raises(ValueError, match=r"shape=\(4, 3\)"):
        build_model("mlp", data_dim=2)(torch.randn(4, 3), torch.zeros(4))


@pytest.mark.parametrize("num_classes", [None, 3])
def test_shared_noise_level_fast_path_matches_per_sample_conditioning(num_classes) -> None:
    """Sampling shares one noise level per step, so eval mode runs the conditioning once per distinct (noise, label):
    the answer must match the per-sample path (training mode with no dropout computes every row)."""
    torch.manual_seed(0)
    net = MLP(num_classes=num_classes, width=32, depth=2)
    nn.init.normal_(net.output_proj.weight)
    x, c_noise = torch.randn(64, 2), torch.full((64,), 0.7)
    conds = [None] if num_classes is None else [None, torch.arange(64) % (num_classes + 1), torch.full((64,), 1)]
    for cond in conds:
        with torch.no_grad():
            fast = net.eval()(x, c_noise, cond)
            per_sample = net.train()(x, c_noise, cond)
        assert fast.abs().max() > 0.1
        torch.testing.assert_close(fast, per_sample, rtol=1e-5, atol=1e-5)
