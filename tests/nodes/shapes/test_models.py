"""The embedded shapes models: shipped in the package, small, loadable by dagfusion and by
diffusers' own pipeline classes, and drawing what their prompts say on held-out prompts."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dagfusion.nodes.shapes import models  # noqa: E402
from dagfusion.nodes.shapes.dataset import ShapesDataset  # noqa: E402
from dagfusion.nodes.metrics.evaluator import SHIPPED, load_shapeeval, predict, score  # noqa: E402

NAMES = tuple(models.EMBEDDED)
SINGLE_OBJECT = ("shapes-sd", "shapes-dit")  # the models ShapeEval's single-object prompts are for
HELD_OUT = ShapesDataset(split="eval").prompts()[::2]  # 48 prompts spread over the 96 held-out ones
# Measured on these 48 prompts at 25 steps, guidance 4, seed i for prompt i, fp32 on the CPU:
# shapes-sd 0.9583 (46 of 48), shapes-dit 0.9792 (47 of 48) all-correct (docs/shapes.md: 0.901 and
# 0.974 over all 96 prompts x 2 seeds). Each floor is its model's measured value minus 5 points.
MEASURED = {"shapes-sd": 0.9583, "shapes-dit": 0.9792}
FLOOR = {name: value - 0.05 for name, value in MEASURED.items()}


@pytest.fixture(scope="module")
def evaluator():
    return load_shapeeval(SHIPPED)


def _run(name: str, prompts: list[str], steps: int = 25):
    from dagfusion.nodes.diffusion.latents import empty_latent
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder
    from dagfusion.nodes.diffusion.sampling import sample
    from dagfusion.nodes.diffusion.text import encode_prompt
    from dagfusion.nodes.diffusion.vae import decode

    loaded = load_diffusers_folder(models.folder(name), dtype="fp32", device="cpu")
    images = []
    for i, prompt in enumerate(prompts):
        latent = sample(loaded.model, encode_prompt(loaded.clip, prompt, ""), empty_latent(loaded.model, 64, 64, 1),
                        steps=steps, guidance_scale=4.0, seed=i)
        images.append(decode(loaded.vae, latent))
    return torch.cat(images)


def test_shipped_weights_are_fp16_and_small() -> None:
    from safetensors import safe_open

    for name in NAMES:
        files = list(models.folder(name).rglob("*.safetensors"))
        assert {f.parent.name for f in files} >= {"vae", "text_encoder"}
        total = 0
        for file in files:
            total += file.stat().st_size
            with safe_open(str(file), "pt") as handle:
                dtypes = {handle.get_slice(k).get_dtype() for k in handle.keys()}
            assert dtypes <= {"F16", "I64"}, (file, dtypes)
        assert total < 20 * 2**20, (name, total)


@pytest.mark.slow
@pytest.mark.usefixtures("both_cores")
@pytest.mark.parametrize("name", SINGLE_OBJECT)
def test_held_out_prompts_come_out_right(name: str, evaluator) -> None:
    images = _run(name, HELD_OUT)
    assert images.shape == (len(HELD_OUT), 3, 64, 64) == (48, 3, 64, 64)
    all_correct = score(evaluator, images, HELD_OUT)["all_correct"]
    print(f"{name}: all-correct {all_correct:.4f} on {len(HELD_OUT)} held-out prompts (floor {FLOOR[name]:.4f})")
    assert all_correct >= FLOOR[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", SINGLE_OBJECT)
def test_diffusers_own_pipeline_samples_the_folder(name: str, evaluator) -> None:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(models.folder(name)), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    expected = {"shapes-sd": "StableDiffusionPipeline", "shapes-dit": "PixArtAlphaPipeline"}[name]
    assert type(pipe).__name__ == expected
    # PixArt's resolution binning knows only the released sizes (256-2048 px); 64 px models turn it off
    extra = {"clean_caption": False, "use_resolution_binning": False} if name == "shapes-dit" else {}
    prompts = HELD_OUT[:6]
    out = pipe(prompts, num_inference_steps=25, guidance_scale=4.0, height=64, width=64,
               generator=torch.Generator().manual_seed(0), output_type="pt", **extra)
    # The same batch through dagfusion's own sampler (same noise: one generator seeded 0 for the
    # batch) is the same picture: measured max abs difference 0 for both models; the tolerance is
    # the sampler-equivalence tests' (tests/nodes/diffusion/test_equivalence.py).
    ours = _batch(name, prompts, seed=0)
    difference = float((ours - out.images).abs().max())
    print(f"{name}: diffusers pipeline vs dagfusion sampler max abs difference {difference:.3g}")
    assert difference <= 1e-5
    assert predict(evaluator, out.images) == predict(evaluator, ours)
    # and, like dagfusion's sampler, it draws all 6 prompts right (measured 6 of 6 for both models)
    assert score(evaluator, out.images, prompts)["all_correct"] == 1.0


def _batch(name: str, prompts: list[str], seed: int):
    """The prompts as one batch (one noise draw for all rows), as the diffusers pipelines sample them."""
    from dagfusion.nodes.diffusion.data import Conditioning
    from dagfusion.nodes.diffusion.latents import empty_latent
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder
    from dagfusion.nodes.diffusion.sampling import sample
    from dagfusion.nodes.diffusion.text import encode_prompt
    from dagfusion.nodes.diffusion.vae import decode

    loaded = load_diffusers_folder(models.folder(name), dtype="fp32", device="cpu")
    rows = [encode_prompt(loaded.clip, p, "") for p in prompts]
    positive = {k: torch.cat([r.positive[k] for r in rows]) for k in rows[0].positive}
    negative = {k: torch.cat([r.negative[k] for r in rows]) for k in rows[0].negative} if rows[0].negative else None
    conditioning = Conditioning(rows[0].kind, positive, negative, {"prompts": prompts})
    with torch.no_grad():
        latent = sample(loaded.model, conditioning, empty_latent(loaded.model, 64, 64, len(prompts)),
                        steps=25, guidance_scale=4.0, seed=seed)
        return decode(loaded.vae, latent)


def test_a_missing_model_is_named_with_the_way_to_make_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(models, "MODELS_DIR", tmp_path)
    with pytest.raises(models.EmbeddedModelMissing, match="train_shapes_dit.yaml"):
        models.folder("shapes-dit")
    with pytest.raises(ValueError, match="expected an embedded model"):
        models.folder("shapes-xl")


def test_load_embedded_node(engine) -> None:
    from dagfusion import load_workflow

    wf = load_workflow("format_version: 1\nnodes:\n  load: {type: dagfusion.models.LoadEmbedded, inputs: {model: shapes-dit, device: cpu}}\n", text=True)
    result = engine.run(wf)
    model = result.output("load.model")
    assert type(model.denoiser).__name__ == "PixArtTransformer2DModel"
    assert result.output("load.clip").kind == "t5"
    assert model.info["source"] == "embedded:shapes-dit"


@pytest.mark.slow
def test_loading_an_embedded_model_imports_only_its_own_classes(tmp_path: Path) -> None:
    """The loader imports the modules of the classes model_index.json names, not every pipeline
    or model family the libraries offer (checked in a fresh process)."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from dagfusion.nodes.diffusion.loading import load_diffusers_folder\n"
        "from dagfusion.nodes.shapes.models import folder\n"
        "load_diffusers_folder(folder('shapes-sd'))\n"
        "needed = ['diffusers.models.unets.unet_2d_condition', 'diffusers.models.autoencoders.autoencoder_kl',\n"
        "          'transformers.models.clip.modeling_clip', 'transformers.models.clip.tokenization_clip']\n"
        "unneeded = ['diffusers.pipelines', 'transformers.pipelines', 'transformers.models.t5']\n"
        "print([m for m in needed if m not in sys.modules], [m for m in unneeded if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True, cwd=tmp_path,
                          env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[] []"
