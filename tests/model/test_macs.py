"""count_macs: per-layer formulas, attention products, hook removal, records and thread isolation."""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from dagfusion.model import MacRecord, count_macs


def test_linear_and_convolutions() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),  # (2, 8, 5, 5): 2*8*25 outputs × 3*9
        nn.Conv2d(8, 8, 3, padding=1, groups=4),  # (2, 8, 5, 5): 400 outputs × 2*9
        nn.ConvTranspose2d(8, 4, 2, stride=2),  # input 2*8*25 elements × 4*4
        nn.Flatten(),
        nn.Linear(4 * 10 * 10, 6),  # 2*6 outputs × 400
    )
    with torch.no_grad(), count_macs(model) as counter:
        model(torch.randn(2, 3, 10, 10))
    expected = [400 * 27, 400 * 18, 400 * 16, 12 * 400]
    assert [r.macs for r in counter.records] == expected
    assert counter.total == sum(expected) and counter.calls == 4
    assert counter.by_kind() == {"conv": 400 * 45, "conv_transpose": 400 * 16, "linear": 12 * 400}
    assert counter.records[0] == MacRecord("0", "conv", 400 * 27)
    assert counter.by_module()["4"] == 12 * 400


def test_conv1d_and_conv3d_and_linear_on_sequences() -> None:
    conv1 = nn.Conv1d(4, 6, 3)
    conv3 = nn.Conv3d(2, 3, (1, 3, 3), padding=(0, 1, 1))
    linear = nn.Linear(5, 7)
    with torch.no_grad(), count_macs(nn.ModuleList([conv1, conv3, linear])) as counter:
        conv1(torch.randn(1, 4, 10))  # 6*8 outputs × 4*3
        conv3(torch.randn(1, 2, 4, 5, 5))  # 3*4*5*5 outputs × 2*9
        linear(torch.randn(2, 3, 5))  # 2*3*7 outputs × 5
    assert [r.macs for r in counter.records] == [48 * 12, 300 * 18, 42 * 5]


def test_diffusers_attention_counts_both_products() -> None:
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    model = nn.ModuleDict({
        "cross": Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8),
        "self": Attention(query_dim=16, heads=2, dim_head=8),
    })
    x, text = torch.randn(3, 10, 16), torch.randn(3, 5, 12)
    with torch.no_grad(), count_macs(model) as counter:
        model["cross"](x, encoder_hidden_states=text)
        model["self"](x)  # keys are the queries' own tokens
    attention = [(r.name, r.macs) for r in counter.records if r.kind == "attention"]
    assert attention == [("cross", 2 * 3 * 2 * 10 * 5 * 8), ("self", 2 * 3 * 2 * 10 * 10 * 8)]
    # The projections are counted as linear layers: to_q, to_k, to_v, to_out.0.
    cross_linear = 30 * 16 * 16 + 2 * (15 * 16 * 12) + 30 * 16 * 16
    self_linear = 4 * (30 * 16 * 16)
    assert counter.by_kind()["linear"] == cross_linear + self_linear


def test_spatial_attention_counts_pixels_as_tokens() -> None:
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim=8, heads=1, dim_head=8, norm_num_groups=4, residual_connection=True, bias=True)
    with torch.no_grad(), count_macs(attn) as counter:
        attn(torch.randn(2, 8, 4, 3))
    assert [r.macs for r in counter.records if r.kind == "attention"] == [2 * 2 * 1 * 12 * 12 * 8]


def test_only_layers_that_run_count_and_hooks_are_removed() -> None:
    model = nn.ModuleDict({"used": nn.Linear(4, 4), "unused": nn.Linear(4, 4)})
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), count_macs(model) as counter:
        model["used"](torch.randn(1, 4))
        raise RuntimeError("boom")
    assert counter.by_module() == {"used": 16}
    assert not any(m._forward_hooks for m in model.modules())
    with torch.no_grad():
        model["used"](torch.randn(1, 4))
    assert counter.total == 16  # nothing counted after the block


def test_records_can_be_turned_off_and_reset() -> None:
    linear = nn.Linear(3, 2)
    with torch.no_grad(), count_macs(linear, records=False) as counter:
        linear(torch.randn(4, 3))
        linear(torch.randn(4, 3))
        assert counter.records == [] and counter.calls == 2 and counter.total == 48
        counter.reset()
        assert counter.total == 0 and counter.by_kind() == {}


def test_calls_from_other_threads_are_not_counted() -> None:
    linear = nn.Linear(3, 2)
    with torch.no_grad(), count_macs(linear) as counter:
        worker = threading.Thread(target=lambda: linear(torch.randn(1, 3)))
        worker.start()
        worker.join()
        linear(torch.randn(1, 3))
    assert counter.calls == 1 and counter.total == 6


def test_unet_total_is_the_sum_of_its_parts() -> None:
    pytest.importorskip("diffusers")
    from dagfusion.testing import models as tiny

    unet = tiny._cached_pipeline("sd", 0).unet
    with torch.no_grad(), count_macs(unet) as counter:
        unet(torch.randn(1, 4, 16, 16), 10, encoder_hidden_states=torch.randn(1, 77, 32))
    kinds = counter.by_kind()
    assert set(kinds) == {"conv", "linear", "attention"}
    assert sum(kinds.values()) == counter.total == sum(r.macs for r in counter.records)
    with torch.no_grad(), count_macs(unet) as twice:
        unet(torch.randn(2, 4, 16, 16), 10, encoder_hidden_states=torch.randn(2, 77, 32))
    assert twice.total == 2 * counter.total  # MACs scale with the batch
