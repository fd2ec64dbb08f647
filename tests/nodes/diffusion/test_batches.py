"""Batched prompts (dagfusion.text.Encode with a list), image batch nodes and the contact sheet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from dagfusion.nodes.diffusion.loading import load_diffusers_folder  # noqa: E402
from dagfusion.nodes.diffusion.text import encode_prompt  # noqa: E402
from dagfusion.nodes.everyday import batches, grid  # noqa: E402

PROMPTS = ["a red fox", "a blue cat in the snow", "the dog"]


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_a_list_of_prompts_encodes_each_row_as_alone(kind: str, sd_folder: Path, sdxl_folder: Path) -> None:
    clip = load_diffusers_folder(sd_folder if kind == "sd" else sdxl_folder).clip
    batch = encode_prompt(clip, PROMPTS, "blurry")
    assert batch.batch_size == 3 and batch.meta["prompt"] == PROMPTS
    for row, prompt in enumerate(PROMPTS):
        alone = encode_prompt(clip, prompt, "blurry")
        for key, value in alone.positive.items():
            assert torch.equal(batch.positive[key][row : row + 1], value)
            assert torch.equal(batch.negative[key][row : row + 1], alone.negative[key])


def test_a_prompt_list_feeds_a_batch_through_the_engine(sd_folder: Path, engine: Any, helpers: Any, tmp_path: Path) -> None:
    result = helpers.run_ok(engine, f"""
    nodes:
      prompts: {{type: dagfusion.text.List, inputs: {{text: "a red fox\\na blue cat"}}}}
      load: {{type: dagfusion.models.LoadDiffusers, inputs: {{path: "{sd_folder}", dtype: fp32}}}}
      text: {{type: dagfusion.text.Encode, inputs: {{clip: {{from: load.clip}}, prompt: {{from: prompts.items}}}}}}
      constant: {{type: dagfusion.text.Encode, inputs: {{clip: {{from: load.clip}}, prompt: ["a red fox", "a blue cat"]}}}}
      latent: {{type: dagfusion.latent.EmptyLatent, inputs: {{model: {{from: load.model}}, width: 32, height: 32, batch_size: 2}}}}
      sample: {{type: dagfusion.sampling.Sample, inputs: {{model: {{from: load.model}}, conditioning: {{from: text.conditioning}}, latent: {{from: latent.latent}}, steps: 2, seed: 0}}}}
      decode: {{type: dagfusion.vae.Decode, inputs: {{vae: {{from: load.vae}}, latent: {{from: sample.latent}}}}}}
      sheet: {{type: dagfusion.image.Grid, inputs: {{images: {{from: decode.image}}, labels: {{from: prompts.items}}, columns: 2}}}}
    """, tmp_path / "out")
    hidden = result.outputs["text"]["conditioning"].positive["encoder_hidden_states"]
    assert hidden.shape[0] == 2
    assert torch.equal(hidden, result.outputs["constant"]["conditioning"].positive["encoder_hidden_states"])
    sheet = result.outputs["sheet"]["image"]
    assert sheet.shape[0] == 1 and sheet.shape[-1] == 2 * 32 + 3 * 2 and sheet.shape[-2] > 32


def test_encode_refuses_an_empty_or_mixed_list(sd_folder: Path) -> None:
    clip = load_diffusers_folder(sd_folder).clip
    with pytest.raises(ValueError, match="at least one prompt"):
        encode_prompt(clip, [])
    with pytest.raises(TypeError, match="item 1 is a int"):
        encode_prompt(clip, ["a", 3])


def _images(count: int, size: int = 8, value: float | None = None) -> Any:
    if value is not None:
        return torch.full((count, 3, size, size), value)
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(count))


def test_batch_unbatch_concat_select_round_trip() -> None:
    a, b = _images(2), _images(3)
    joined = batches.concat_images.fn(None, a=a, b=b)
    assert torch.equal(joined, torch.cat([a, b]))
    singles = batches.unbatch_images.fn(None, images=joined)
    assert len(singles) == 5 and all(s.shape == (1, 3, 8, 8) for s in singles)
    assert torch.equal(batches.batch_images.fn(None, images=singles), joined)
    picked = batches.select_images.fn(None, images=joined, indices="-1, 0:2, 2")
    assert torch.equal(picked, joined[[4, 0, 1, 2]])
    assert torch.equal(batches.batch_images.fn(None, images=[a[0], b]), torch.cat([a[:1], b]))  # (C, H, W) too


def test_batch_errors_name_the_shapes() -> None:
    with pytest.raises(ValueError, match=r"item 1 has images of shape \(3, 16, 16\).*item 0 has \(3, 8, 8\)"):
        batches.concat_images.fn(None, a=_images(1), b=_images(1, 16))
    with pytest.raises(ValueError, match="outside a batch of 2"):
        batches.select_images.fn(None, images=_images(2), indices="5")
    with pytest.raises(ValueError, match="expected indices"):
        batches.select_images.fn(None, images=_images(2), indices="first")
    with pytest.raises(ValueError, match="selects no image"):
        batches.select_images.fn(None, images=_images(2), indices=" , ")


def test_grid_layout_and_labels() -> None:
    images = torch.cat([_images(1, 16, 0.0), _images(1, 16, 1.0), _images(1, 16, 0.5)])
    plain = grid.contact_sheet(images, None, columns=2, padding=2, background="black")
    assert plain.shape == (1, 3, 2 * 16 + 3 * 2, 2 * 16 + 3 * 2)
    assert torch.equal(plain[0, :, 2 + 16 + 2 :, 2 + 16 + 2 :], torch.zeros(3, 18, 18))  # empty fourth cell
    assert torch.allclose(plain[0, :, 2:18, 20:36], torch.ones(3, 16, 16))  # second image, top right
    labelled = grid.contact_sheet(images, ["one", "a label long enough to wrap"], columns=3, padding=0, background="black")
    assert labelled.shape[-1] == 48 and labelled.shape[-2] > 16
    strip = labelled[0, :, 16:, :]
    assert strip[:, :, :16].max() > 0.5 and strip[:, :, 32:].max() == 0  # text under labelled cells only
    one = grid.grid.fn(None, images=images[:1], labels=None, columns=0, padding=0, background="white")
    assert torch.equal(one, images[:1])
    with pytest.raises(ValueError, match="4 labels for 3 image"):
        grid.contact_sheet(images, ["a", "b", "c", "d"])


def test_wrap_keeps_lines_within_the_width() -> None:
    lines = grid.wrap("a bb ccc dddddddddd", 4, len)
    assert lines == ["a bb", "ccc", "dddd", "dddd", "dd"]
