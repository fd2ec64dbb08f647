"""Training ControlNets and T2I-Adapters on the shared loop: the loss on a fixed batch goes down,
the UNet stays frozen, condition dropout, multi-channel maps, checkpoint resume and save → load."""

from __future__ import annotations

import contextlib

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")


def _batch(channels: int = 3):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=g)
    if channels == 3:
        control = images.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1).contiguous()
    else:  # depth + normal + mask, as a refiner's conditioning
        depth = images.mean(dim=1, keepdim=True)
        normal = torch.nn.functional.normalize(images * 2 - 1, dim=1)
        mask = (depth > 0.5).float()
        from dagfusion.nodes.structure.controlnet_maps import stack_control

        control = stack_control({"depth": depth, "normal": normal, "mask": mask})
    return images, ["a red circle", "a blue square"], control


def _fixed_loss(model, network, kind, images, captions, control, vae, clip) -> float:
    """The control objective's loss on one fixed batch, noise and timesteps (no dropout)."""
    from dagfusion.model import applying, family_for
    from dagfusion.nodes.diffusion.text import encode_prompt
    from dagfusion.nodes.diffusion.vae import from_vae_space
    from dagfusion.nodes.structure.train_control import ControlBatch, ControlObjective, ControlTrainPatch
    from dagfusion.nodes.training.data import Examples
    from dagfusion.nodes.training.objectives import EpsilonObjective, ModelCall, TrainBatch, TrainStep

    unet = model.denoiser
    with torch.no_grad():
        x0 = from_vae_space(vae.module, vae.module.encode(images * 2 - 1).latent_dist.mode())
        ehs = torch.cat([encode_prompt(clip, c, "").positive["encoder_hidden_states"] for c in captions])
    patch = ControlTrainPatch(network.module, kind, network.fingerprint)
    objective = ControlObjective(EpsilonObjective(), 0.0)
    call = ModelCall(unet, family_for(unet), {"encoder_hidden_states": ehs}, contextlib.nullcontext)
    examples = Examples(images, tuple(captions), ControlBatch(images, tuple(captions), control))
    with applying(unet, patch), torch.no_grad():
        losses = [float(objective.loss(call, TrainBatch(x0, tuple(captions), examples), TrainStep(0, 1),
                                       torch.Generator().manual_seed(seed))[0]) for seed in range(4)]
    return sum(losses) / len(losses)


def _train(model, network, kind, data, parts, steps=12, **options):
    from types import SimpleNamespace

    from dagfusion.nodes.structure.train_control import train_network
    from dagfusion.nodes.training.objectives import EpsilonObjective

    inputs = {"data": data, "clip": parts["clip"], "vae": parts["vae"], "objective": EpsilonObjective(),
              "condition_dropout": 0.0, "steps": steps, "batch_size": 2, "learning_rate": 2e-3, "schedule": "constant",
              "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "caption_dropout": 0.0, "precision": "fp32",
              "ema_decay": 0.0, "seed": 0, "checkpoint_every": 0, "keep_checkpoints": 0, "resume": None,
              "auto_resume": False, "time_limit": 0.0, **options}
    ctx = SimpleNamespace(progress=lambda *a, **k: None, check_cancelled=lambda: None,
                          logger=__import__("logging").getLogger("test"), settings=options.pop("settings", None),
                          run_id="r", node_id="n")
    return train_network(ctx, kind, f"test.{kind}", model, network, inputs)


@pytest.mark.slow
@pytest.mark.parametrize("channels", [3, 5])
def test_controlnet_training_lowers_the_loss_and_freezes_the_unet(channels):
    from dagfusion.nodes.structure.controlnet import controlnet_from_unet
    from dagfusion.nodes.structure.train_control import ControlData
    from dagfusion.testing import models as tiny

    parts = tiny.sd_handles()
    model = parts["model"]
    unet_before = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    network = controlnet_from_unet.fn(None, model=model, conditioning_channels=channels, seed=0)
    images, captions, control = _batch(channels)
    data = ControlData(images, captions, control, shuffle=False)
    before = _fixed_loss(model, network, "controlnet", images, captions, control, parts["vae"], parts["clip"])
    out = _train(model, network, "controlnet", data, parts)
    after = _fixed_loss(model, out["network"], "controlnet", images, captions, control, parts["vae"], parts["clip"])
    assert after < before * 0.97, (before, after)
    for k, v in model.denoiser.state_dict().items():  # the shared UNet is untouched
        assert torch.equal(v, unet_before[k]), k
    # the input ControlNet is untouched too (the loop trained a copy)
    assert all(float(p.abs().max()) == 0 for p in network.module.controlnet_down_blocks.parameters())
    assert out["network"].conditioning_channels == channels


@pytest.mark.slow
def test_adapter_training_lowers_the_loss():
    from dagfusion.nodes.structure.adapter import adapter_new, tiny_adapter_handles
    from dagfusion.nodes.structure.train_control import ControlData

    parts = tiny_adapter_handles()
    network = adapter_new.fn(None, model=parts["model"], conditioning_channels=3, num_res_blocks=1,
                             adapter_type="full_adapter", seed=0)
    images, captions, control = _batch(3)
    data = ControlData(images, captions, control, shuffle=False)
    before = _fixed_loss(parts["model"], network, "adapter", images, captions, control, parts["vae"], parts["clip"])
    out = _train(parts["model"], network, "adapter", data, parts, steps=20, learning_rate=3e-3)
    after = _fixed_loss(parts["model"], out["network"], "adapter", images, captions, control, parts["vae"], parts["clip"])
    # deterministic on the CPU: 1.1705 -> 1.1551 (the random tiny UNet leaves little for an adapter to explain)
    assert after < before * 0.995, (before, after)


def test_condition_dropout_zeroes_whole_rows():
    from dagfusion.nodes.structure.train_control import drop_conditions

    control = torch.rand(64, 5, 4, 4) + 0.1
    dropped, keep = drop_conditions(control, 0.5, torch.Generator().manual_seed(0))
    assert 10 < int(keep.sum()) < 54
    assert torch.equal(dropped[keep], control[keep]) and float(dropped[~keep].abs().max()) == 0.0
    assert torch.equal(drop_conditions(control, 0.0, torch.Generator())[0], control)
    assert float(drop_conditions(control, 1.0, torch.Generator())[0].abs().max()) == 0.0


def test_grouped_condition_dropout_zeroes_each_group_on_its_own():
    from dagfusion.nodes.structure.train_control import drop_condition_groups

    control = torch.rand(256, 6, 4, 4) + 0.1
    groups = ((0, 1), (1, 4), (4, 6))
    dropped, keep = drop_condition_groups(control, groups, 0.5, torch.Generator().manual_seed(0))
    assert keep.shape == (256, 3)
    for g, (first, end) in enumerate(groups):
        kept, part = keep[:, g], dropped[:, first:end]
        assert torch.equal(part[kept], control[kept, first:end]) and float(part[~kept].abs().max()) == 0.0
        assert 0.4 < float(kept.float().mean()) < 0.6
    together = (keep[:, 0] == keep[:, 1]) & (keep[:, 1] == keep[:, 2])
    assert float(together.float().mean()) < 0.5  # independent draws, not the whole map at once (1/4 expected)
    with pytest.raises(ValueError, match="reaches past"):
        drop_condition_groups(control, ((4, 7),), 0.5, torch.Generator())


def test_condition_groups_parse_and_change_the_training_key_only_when_given():
    from dagfusion import NodeInputError
    from dagfusion.nodes.structure.train_control import ControlObjective, control_objective, parse_condition_groups
    from dagfusion.nodes.training.objectives import EpsilonObjective

    assert parse_condition_groups("layout=4:6, depth=0:1, normal=1:4") == ((0, 1), (1, 4), (4, 6))
    assert parse_condition_groups("0:1,1:4") == ((0, 1), (1, 4)) and parse_condition_groups("") == ()
    for bad in ("depth=0-1", "normal=3:3", "0:2, 1:4"):
        with pytest.raises(ValueError):
            parse_condition_groups(bad)
    whole = ControlObjective(EpsilonObjective(), 0.1)
    assert "groups" not in whole.key() and "condition_groups" not in whole.describe()
    grouped = control_objective.fn(None, EpsilonObjective(), 0.1, "depth=0:1, normal=1:4")
    assert grouped.groups == ((0, 1), (1, 4)) and grouped.key() != whole.key()
    with pytest.raises(NodeInputError) as caught:
        control_objective.fn(None, EpsilonObjective(), 0.1, "0:2, 1:4")
    assert caught.value.input == "groups" and "overlap" in str(caught.value)


def test_a_grouped_objective_trains_a_controlnet_and_reports_the_kept_fraction():
    from dagfusion.nodes.structure.controlnet import controlnet_from_unet
    from dagfusion.nodes.structure.train_control import ControlData, ControlObjective
    from dagfusion.nodes.training.objectives import EpsilonObjective
    from dagfusion.testing import models as tiny

    parts = tiny.sd_handles()
    network = controlnet_from_unet.fn(None, model=parts["model"], conditioning_channels=3, seed=0)
    images, captions, control = _batch(3)
    out = _train(parts["model"], network, "controlnet", ControlData(images, captions, control, shuffle=False), parts,
                 steps=2, objective=ControlObjective(EpsilonObjective(), 0.5, ((0, 1), (1, 3))))
    assert out["network"].fingerprint != network.fingerprint and out["final_loss"] == out["final_loss"]


def test_data_checks_channels_against_the_network(tmp_path):
    from dagfusion import NodeInputError
    from dagfusion.nodes.structure.controlnet import tiny_controlnet
    from dagfusion.nodes.structure.train_control import ControlData
    from dagfusion.testing import models as tiny

    images, captions, control = _batch(5)
    with pytest.raises(NodeInputError, match="takes 3 conditioning channels, the data's control maps have 5"):
        _train(tiny.sd_handles()["model"], tiny_controlnet(), "controlnet", ControlData(images, captions, control),
               tiny.sd_handles(), steps=1)


@pytest.mark.slow
def test_resume_from_a_checkpoint_gives_the_same_weights(tmp_path):
    from dagfusion.nodes.structure.controlnet import tiny_controlnet
    from dagfusion.nodes.structure.train_control import ControlData, ControlObjective, ControlTrainPatch
    from dagfusion.nodes.training import checkpoint as ckpt
    from dagfusion.nodes.training.loop import CheckpointPolicy, TrainConfig, train
    from dagfusion.nodes.training.objectives import EpsilonObjective
    from dagfusion.testing import models as tiny

    parts = tiny.sd_handles()
    network = tiny_controlnet()
    images, captions, control = _batch(3)
    data = ControlData(images, captions, control)
    model = parts["model"].with_patch(ControlTrainPatch(network.module, "controlnet", network.fingerprint))
    objective = ControlObjective(EpsilonObjective(), 0.3)
    config = TrainConfig(steps=4, batch_size=2, learning_rate=1e-3, trainable="patches", caption_dropout=0.0)
    straight = train(model, data, parts["clip"], parts["vae"], objective, config,
                     checkpoints=CheckpointPolicy(folder=tmp_path / "a", every=2, keep=0))
    halfway = dict(ckpt.steps(tmp_path / "a"))[2]
    resumed = train(model, data, parts["clip"], parts["vae"], objective, config, resume=halfway)
    a = straight.model.patches[-1].network.state_dict()
    b = resumed.model.patches[-1].network.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], network.module.state_dict()[k]) for k in a)  # it did train


def test_trained_controlnet_saves_and_loads_exactly(tmp_path):
    from dagfusion.nodes.structure.controlnet import tiny_controlnet
    from dagfusion.nodes.structure.controlnet_model import load_module, save_folder, save_single_file
    from dagfusion.nodes.structure.train_control import ControlData
    from dagfusion.testing import models as tiny

    parts = tiny.sd_handles()
    images, captions, control = _batch(3)
    out = _train(parts["model"], tiny_controlnet(), "controlnet", ControlData(images, captions, control), parts, steps=1)
    trained = out["network"]
    for path in (save_folder(trained, tmp_path / "folder"), save_single_file(trained, tmp_path / "cn.safetensors")):
        loaded = load_module(path, architecture="auto", config=None, dtype="fp32", device="cpu")
        reference = trained.module.state_dict()
        assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())
