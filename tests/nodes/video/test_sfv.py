"""SF-V: what trains in the discriminator, the step's losses, bit-exact resume, one-step sampling."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from dagfusion import NodeInputError, RunCancelled
from dagfusion.nodes.diffusion.sampling import run_sampling
from dagfusion.nodes.training import checkpoint as ckpt
from dagfusion.nodes.video.sfv import (
    ClipSet,
    Discriminator,
    OneStepPatch,
    SFVConfig,
    discriminator_logits,
    generate,
    make_models,
    one_step_patch,
    prepare_batch,
    sample_one_step,
    sfv_step,
    train_sfv,
    train_sfv_node,
)
from dagfusion.nodes.video.svd import _tiny_cached, sample_video, svd_conditioning

torch.set_num_threads(1)

CONFIG = SFVConfig(steps=4, head_channels=16, generator_lr=1e-4, discriminator_lr=1e-3, seed=3)


@pytest.fixture(scope="module")
def parts() -> dict[str, Any]:
    return _tiny_cached()


@pytest.fixture(scope="module")
def clips() -> torch.Tensor:
    return torch.rand(3, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def trained(parts: dict[str, Any], clips: torch.Tensor) -> Any:
    return train_sfv(parts["model"], parts["clip_vision"], parts["vae"], clips, SFVConfig(steps=1, head_channels=8))


def _batch(parts: dict[str, Any], clips: torch.Tensor, config: SFVConfig = CONFIG) -> Any:
    return prepare_batch(clips[:1], clip_vision=parts["clip_vision"], vae=parts["vae"], config=config,
                         rng=torch.Generator().manual_seed(0), device="cpu")


def test_heads_train_and_the_encoder_copy_does_not(parts: dict[str, Any], clips: torch.Tensor) -> None:
    models = make_models(parts["model"].denoiser, CONFIG)
    disc = models.discriminator
    assert isinstance(disc, Discriminator)
    trainable = {n for n, p in disc.named_parameters() if p.requires_grad}
    assert trainable == set(models.d_params) and trainable
    assert all(n.startswith(("spatial.", "temporal.")) for n in trainable)
    assert not any(p.requires_grad for p in disc.encoder.parameters())
    # the encoder is a copy: the source UNet's and the generator's weights are other tensors
    source = dict(parts["model"].denoiser.named_parameters())["conv_in.weight"]
    assert disc.encoder.conv_in.weight.data_ptr() not in (source.data_ptr(), models.generator.conv_in.weight.data_ptr())
    assert torch.equal(disc.encoder.conv_in.weight, source)

    batch = _batch(parts, clips)
    before = {n: p.detach().clone() for n, p in disc.encoder.named_parameters()}
    x = batch.x0.clone().requires_grad_(True)
    logits = disc(x, torch.tensor([0.5]), batch.inputs)
    assert len(logits) == 6 and all(t.shape[0] == 1 for t in logits)  # 3 spatial + 3 temporal (2 down blocks + mid)
    torch.cat(logits, 1).mean().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for n, p in models.d_params.items()
               if not n.endswith("frame.weight")), "every head weight gets a gradient"
    assert all(p.grad is None for p in disc.encoder.parameters())
    assert x.grad is not None and float(x.grad.abs().sum()) > 0  # gradients reach the input (the generator)
    sfv_step(models, batch, CONFIG, torch.Generator().manual_seed(1))
    assert all(torch.equal(before[n], p) for n, p in disc.encoder.named_parameters())


def test_the_generator_step_leaves_the_heads_and_the_discriminator_step_the_generator(
    parts: dict[str, Any], clips: torch.Tensor
) -> None:
    models = make_models(parts["model"].denoiser, CONFIG)
    batch = _batch(parts, clips)
    heads = {n: p.detach().clone() for n, p in models.d_params.items()}
    gen = {n: p.detach().clone() for n, p in models.g_params.items()}
    values = sfv_step(models, batch, CONFIG, torch.Generator().manual_seed(1), train_discriminator=False)
    assert set(values) == {"loss_g", "recon", "adv_g", "loss_d", "d_real", "d_fake", "sigma_d"}
    assert all(torch.equal(heads[n], p) for n, p in models.d_params.items())
    assert any(not torch.equal(gen[n], p) for n, p in models.g_params.items())
    assert values["loss_g"] == pytest.approx(values["recon"] + values["adv_g"], rel=1e-5)
    gen = {n: p.detach().clone() for n, p in models.g_params.items()}
    sfv_step(models, batch, CONFIG, torch.Generator().manual_seed(1), train_generator=False)
    assert all(torch.equal(gen[n], p) for n, p in models.g_params.items())
    assert any(not torch.equal(heads[n], p) for n, p in models.d_params.items())


def test_losses_go_the_expected_way_on_a_fixed_batch(parts: dict[str, Any], clips: torch.Tensor) -> None:
    models = make_models(parts["model"].denoiser, CONFIG)
    batch = _batch(parts, clips)
    d_losses = [sfv_step(models, batch, CONFIG, torch.Generator().manual_seed(5), train_generator=False)["loss_d"]
                for _ in range(4)]
    assert d_losses[-1] < d_losses[0] - 0.02, d_losses  # only the discriminator trains: its hinge loss falls
    recon_only = SFVConfig(steps=4, head_channels=16, generator_lr=5e-4, lambda_adv=0.0)
    models = make_models(parts["model"].denoiser, recon_only)
    recon = [sfv_step(models, batch, recon_only, torch.Generator().manual_seed(5), train_discriminator=False)["recon"]
             for _ in range(4)]
    assert recon[-1] < recon[0], recon  # only the generator trains on reconstruction: it falls


def test_checkpoint_and_resume_are_bit_exact(parts: dict[str, Any], clips: torch.Tensor, tmp_path: Path) -> None:
    config = SFVConfig(steps=2, head_channels=16, generator_lr=1e-4, discriminator_lr=1e-3, seed=3)
    args = (parts["model"], parts["clip_vision"], parts["vae"], ClipSet(clips, seed=1))
    straight = train_sfv(*args, config, folder=tmp_path / "a", key="k")
    assert len(straight.logs) == 2

    def cancel_after_one() -> None:
        if calls.append(1) or len(calls) == 2:  # before the second step: one is done
            raise RunCancelled("stop")

    calls: list[int] = []
    with pytest.raises(RunCancelled):
        train_sfv(*args, config, folder=tmp_path / "b", key="k", check_cancelled=cancel_after_one)
    half = ckpt.latest(tmp_path / "b")
    assert half is not None and half.name == ckpt.step_name(1)  # the cancel saved the finished step
    resumed = train_sfv(*args, config, folder=tmp_path / "b", key="k", resume=half)
    assert resumed.start_step == 1 and len(resumed.logs) == 1
    assert resumed.logs == straight.logs[1:]
    a = ckpt.load(ckpt.latest(tmp_path / "a"))
    b = ckpt.load(ckpt.latest(tmp_path / "b"))
    assert a.step == b.step == 2
    assert set(a.weights) == set(b.weights) and any(k.startswith("@disc.") for k in a.weights)
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert all(torch.equal(a.optimizer[k], b.optimizer[k]) for k in a.optimizer)
    first, second = straight.model.denoiser.state_dict(), resumed.model.denoiser.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["conv_in.weight"], parts["model"].denoiser.state_dict()["conv_in.weight"])


def _cond(parts: dict[str, Any], frames: int = 2) -> tuple[Any, Any]:
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    return svd_conditioning(parts["clip_vision"], parts["vae"], image, width=32, height=32, frames=frames, fps=7,
                            motion_bucket_id=127, noise_aug_strength=0.02, seed=1)


def test_one_step_sampling_equals_the_generator_called_directly(parts: dict[str, Any], trained: Any) -> None:
    model = trained.model
    assert model.info["one_step"] == {"method": "sf-v", "sigma": 700.0}
    assert one_step_patch(model).sigma == 700.0 and one_step_patch(parts["model"]) is None
    cond, latent = _cond(parts)
    out, report = sample_one_step.fn(SimpleNamespace(check_cancelled=lambda: None, progress=lambda *a, **k: None,
                                                     handler=None), model, cond, latent, 4)
    assert len(report.steps) == 1 and report.steps[0].denoiser_calls == 1
    noise = torch.randn(latent.samples.shape, generator=torch.Generator().manual_seed(4))
    image = cond.positive["image_latents"].expand(-1, 2, -1, -1, -1)
    inputs = SimpleNamespace(encoder_hidden_states=cond.positive["encoder_hidden_states"],
                             added_time_ids=cond.positive["added_time_ids"], concat=image)
    start = noise * (700.0**2 + 1) ** 0.5  # the sampler's ε·init_noise_sigma
    with torch.no_grad():
        direct = generate(model.denoiser, start, 700.0, inputs)  # type: ignore[arg-type]
    # the Euler step to σ = 0 computes x + (x − D)·(0 − σ)/σ in float32: D up to a few ulps of |x| ≈ 700·|ε|
    ulps = 4 * torch.finfo(torch.float32).eps * float(start.abs().max())
    gap = float((out.samples - direct).abs().max())
    assert gap <= ulps, (gap, ulps)
    # the generic video sampler with one step and no guidance is the same run
    video = sample_video.fn(SimpleNamespace(check_cancelled=lambda: None, progress=lambda *a, **k: None, handler=None),
                            model, cond, latent, 1, 4, 1.0, 1.0, "default", 0)
    assert torch.allclose(video["latent"].samples, out.samples)
    # a different seed gives a different clip (the noise is really used)
    other, _ = sample_one_step.fn(SimpleNamespace(check_cancelled=lambda: None, progress=lambda *a, **k: None,
                                                  handler=None), model, cond, latent, 5)
    assert float((other.samples - out.samples).abs().max()) > 100 * ulps


def test_a_one_step_model_refuses_multi_step_schedules(parts: dict[str, Any], trained: Any) -> None:
    cond, latent = _cond(parts)
    with pytest.raises(ValueError, match="one-step generator.*steps=1"):
        run_sampling(trained.model, cond, latent, steps=25, guidance_scale=1.0, count_macs=False)
    from dagfusion.nodes.video.sfv import one_step_scheduler

    with pytest.raises(ValueError, match="trained at sigma 700 but the scheduler starts at sigma 80"):
        run_sampling(trained.model, cond, latent, scheduler=one_step_scheduler(80.0), steps=1, guidance_scale=1.0,
                     count_macs=False)
    with pytest.raises(NodeInputError) as info:
        sample_one_step.fn(SimpleNamespace(), parts["model"], cond, latent, 0)
    assert info.value.input == "model"
    assert OneStepPatch(700.0).key != OneStepPatch(80.0).key


def test_discriminator_logits_depend_on_the_first_frame(parts: dict[str, Any], clips: torch.Tensor) -> None:
    models = make_models(parts["model"].denoiser, CONFIG)
    batch = _batch(parts, clips)
    with torch.no_grad():
        a = discriminator_logits(models.discriminator, batch.x0, torch.tensor([1.0]), batch.inputs)
        other = SimpleNamespace(encoder_hidden_states=torch.zeros_like(batch.inputs.encoder_hidden_states),
                                added_time_ids=batch.inputs.added_time_ids, concat=torch.zeros_like(batch.inputs.concat))
        b = discriminator_logits(models.discriminator, batch.x0, torch.tensor([1.0]), other)  # type: ignore[arg-type]
    assert a.shape == b.shape and not torch.allclose(a, b)


class _Ctx:
    """A run context for calling the node function directly."""

    def __init__(self, cache: Path) -> None:
        self.settings = SimpleNamespace(cache_dir=str(cache), readable_roots=[cache])
        self.events: list[tuple[int, int | None, dict[str, float]]] = []
        self.logger = logging.getLogger("test.sfv")
        self.run_id, self.node_id = "run", "train"

    def progress(self, step: int, total: int | None = None, message: str = "", **values: float) -> None:
        self.events.append((step, total, values))

    def check_cancelled(self) -> None:
        return None


def test_train_node_reports_progress_and_resumes_its_own_checkpoint(parts: dict[str, Any], clips: torch.Tensor,
                                                                    tmp_path: Path) -> None:
    ctx = _Ctx(tmp_path)
    kwargs: dict[str, Any] = {
        "model": parts["model"], "clip_vision": parts["clip_vision"], "vae": parts["vae"], "clips": clips, "steps": 2,
        "batch_size": 1, "generator_lr": 1e-4, "discriminator_lr": 1e-3, "generator_sigma": 700.0, "disc_p_mean": -1.0,
        "disc_p_std": 1.0, "lambda_recon": 1.0, "lambda_adv": 1.0, "head_channels": 8, "fps": 7, "motion_bucket_id": 127,
        "noise_aug_strength": 0.02, "max_grad_norm": 1.0, "seed": 0, "checkpoint_every": 1, "keep_checkpoints": 0,
        "resume": None, "auto_resume": True, "time_limit": 0.0,
    }
    out = train_sfv_node.fn(ctx, **kwargs)
    assert [e[0] for e in ctx.events] == [1, 2] and {"loss_g", "loss_d"} <= set(ctx.events[0][2])
    folder = Path(out["checkpoint_dir"])
    assert [s for s, _ in ckpt.steps(folder)] == [1, 2]
    again = train_sfv_node.fn(_Ctx(tmp_path), **kwargs)  # finds its finished checkpoint: no step runs
    assert again["generator_loss"] == pytest.approx(out["generator_loss"])
    first, second = out["model"].denoiser.state_dict(), again["model"].denoiser.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(NodeInputError) as info:
        train_sfv_node.fn(ctx, **{**kwargs, "clips": torch.rand(1, 30, 3, 32, 32)})
    assert info.value.input == "clips" and "at most 25 frames" in str(info.value)
    with pytest.raises(NodeInputError, match="without patches") as info:
        train_sfv_node.fn(ctx, **{**kwargs, "model": out["model"]})  # a one-step model is not trained again
    assert info.value.input == "model"


def test_nodes_keep_the_node_contract(tmp_path: Path) -> None:
    import types

    from dagfusion import hookimpl
    from dagfusion.nodes.video import sfv, svd
    from dagfusion.registry import Registry
    from dagfusion.testing import check_node_contract

    @hookimpl
    def register_types(register: Any) -> None:
        for socket_type in (*svd.TYPES, *sfv.TYPES):
            register(socket_type)

    @hookimpl
    def register_nodes(register: Any) -> None:
        for spec in sfv.NODES:
            register(spec)

    plugin = types.SimpleNamespace(register_types=register_types, register_nodes=register_nodes)
    registry = Registry.from_plugins(load_entrypoints=False, extra_plugins=[("sfv-test", plugin)], environ={})
    for spec in sfv.NODES:  # declarations, and the examples run twice with equal results
        assert check_node_contract(spec.type_id, registry, tmp_path=tmp_path / spec.type_id,
                                   require_input_docs=True) == []


def test_each_clip_is_conditioned_on_its_own_motion_bucket(parts: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A source that knows each clip's bucket (shapes-video) overrides the configured one."""
    import dagfusion.nodes.video.sfv as sfv
    from dagfusion.nodes.shapes.motion import ShapesVideoDataset
    from dagfusion.nodes.video.shapes_data import ShapesVideoSource

    source = ShapesVideoSource(ShapesVideoDataset("train", resolution=32, frames=2, seed=0))
    seen: list[list[float]] = []
    original = sfv.prepare_batch

    def spy(*args: Any, **kwargs: Any) -> Any:
        batch = original(*args, **kwargs)
        seen.append(batch.inputs.added_time_ids[:, 1].tolist())
        return batch

    monkeypatch.setattr(sfv, "prepare_batch", spy)
    train_sfv(parts["model"], parts["clip_vision"], parts["vae"], source, SFVConfig(steps=2, batch_size=3, head_channels=8))
    assert seen == [[float(b) for b in source.motion_bucket_ids(0, 3)], [float(b) for b in source.motion_bucket_ids(3, 3)]]
    assert len({b for row in seen for b in row}) == 2  # both speeds occur: the ids are not the configured 127


def test_a_time_limit_pauses_with_a_checkpoint_and_the_rerun_continues(parts: dict[str, Any], clips: torch.Tensor,
                                                                      tmp_path: Path) -> None:
    from dagfusion.nodes.training.loop import TrainingPaused

    config = SFVConfig(steps=3, head_channels=8, seed=1)
    args = (parts["model"], parts["clip_vision"], parts["vae"], ClipSet(clips, seed=1))
    with pytest.raises(TrainingPaused, match="step 1 of 3"):
        train_sfv(*args, config, folder=tmp_path, key="k", time_limit=1e-9)
    paused = ckpt.latest(tmp_path)
    assert paused is not None and paused.name == ckpt.step_name(1)
    resumed = train_sfv(*args, config, folder=tmp_path, key="k", resume=paused)
    straight = train_sfv(*args, config, folder=tmp_path / "straight", key="k")
    assert resumed.start_step == 1 and resumed.logs == straight.logs[1:]
