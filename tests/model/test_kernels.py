"""Time-only Conv3d layers computed as a Conv2d: same outputs and gradients, same layer to everything else."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dagfusion.model import is_time_only_conv, use_time_only_convs


def _pair(**kwargs) -> tuple[nn.Conv3d, nn.Conv3d]:
    torch.manual_seed(0)
    reference = nn.Conv3d(**kwargs)
    fast = nn.Conv3d(**kwargs)
    fast.load_state_dict(reference.state_dict())
    assert use_time_only_convs(fast) == 1
    return reference, fast


@pytest.mark.parametrize(
    "kwargs",
    [
        {"in_channels": 8, "out_channels": 6, "kernel_size": (3, 1, 1), "padding": (1, 0, 0)},
        {"in_channels": 8, "out_channels": 8, "kernel_size": (3, 1, 1), "padding": (0, 0, 0), "bias": False},
        {"in_channels": 8, "out_channels": 4, "kernel_size": (5, 1, 1), "padding": (2, 0, 0), "groups": 4},
    ],
)
def test_outputs_and_gradients_equal_conv3d(kwargs):
    reference, fast = _pair(**kwargs)
    x = torch.randn(2, kwargs["in_channels"], 7, 5, 6)
    x_ref, x_fast = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_ref, out_fast = reference(x_ref), fast(x_fast)
    assert out_fast.shape == out_ref.shape
    torch.testing.assert_close(out_fast, out_ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out_ref)
    out_ref.backward(grad)
    out_fast.backward(grad)
    torch.testing.assert_close(x_fast.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.weight.grad, reference.weight.grad, atol=1e-4, rtol=1e-5)


def test_non_contiguous_input_like_a_permuted_video():
    reference, fast = _pair(in_channels=4, out_channels=4, kernel_size=(3, 1, 1), padding=(1, 0, 0))
    frames_first = torch.randn(1, 6, 4, 5, 5)  # (B, F, C, H, W), as video blocks hold it
    x = frames_first.permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(fast(x), reference(x), atol=1e-5, rtol=1e-5)


def test_the_layer_stays_a_conv3d_with_the_same_state():
    reference, fast = _pair(in_channels=4, out_channels=4, kernel_size=(3, 1, 1), padding=(1, 0, 0))
    assert isinstance(fast, nn.Conv3d)
    assert list(fast.state_dict()) == list(reference.state_dict())
    assert use_time_only_convs(fast) == 0  # already converted: idempotent


def test_converted_layers_pickle_and_copy():
    import copy
    import pickle

    reference, fast = _pair(in_channels=4, out_channels=4, kernel_size=(3, 1, 1), padding=(1, 0, 0))
    x = torch.randn(1, 4, 5, 3, 3)
    for clone in (pickle.loads(pickle.dumps(fast)), copy.deepcopy(fast)):
        assert type(clone) is type(fast)
        torch.testing.assert_close(clone(x), reference(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv3d(4, 4, 3, padding=1),
        nn.Conv3d(4, 4, (3, 1, 1), stride=(2, 1, 1)),
        nn.Conv3d(4, 4, (3, 1, 1), padding=(1, 0, 0), padding_mode="replicate"),
        nn.Conv3d(4, 4, (3, 1, 1), padding="same"),
        nn.Conv3d(4, 4, (3, 1, 1), padding=(1, 1, 1)),
        nn.Conv2d(4, 4, (3, 1)),
    ],
)
def test_other_layers_are_left_alone(layer):
    before = type(layer)
    assert not is_time_only_conv(layer)
    assert use_time_only_convs(nn.Sequential(layer)) == 0
    assert type(layer) is before


def test_a_video_unet_keeps_its_outputs():
    from diffusers import UNetSpatioTemporalConditionModel

    from dagfusion.nodes.video.build import CONFIGS

    torch.manual_seed(0)
    reference = UNetSpatioTemporalConditionModel(**CONFIGS["tiny-svd"]["unet"]).eval()
    fast = UNetSpatioTemporalConditionModel(**CONFIGS["tiny-svd"]["unet"]).eval()
    fast.load_state_dict(reference.state_dict())
    assert use_time_only_convs(fast) > 0
    config = reference.config
    frames = 3
    x = torch.randn(1, frames, config.in_channels, config.sample_size, config.sample_size)
    embeds = torch.randn(1, 1, config.cross_attention_dim)
    ids = torch.tensor([[6.0, 127.0, 0.02]])
    with torch.no_grad():
        torch.testing.assert_close(fast(x, 1.0, embeds, ids).sample, reference(x, 1.0, embeds, ids).sample,
                                   atol=1e-5, rtol=1e-4)
