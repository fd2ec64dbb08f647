"""The data-source seam: shapes datasets and batch() objects adapt; ImageCaptionData; custom adapters."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from dagfusion.nodes.training import data as training_data  # noqa: E402
from dagfusion.nodes.training.data import Examples, ImageCaptionData, TrainingData, as_training_data  # noqa: E402


def test_shapes_dataset_is_a_data_source(shapes):
    source = as_training_data(shapes)
    examples = source.examples(5, 3)
    expected = shapes.batch(5, 3)
    assert torch.equal(examples.images, expected.images)
    assert examples.captions == expected.captions and examples.raw is not None
    assert source.describe()["source"] == "ShapesDataset"
    assert source.__dagfusion_fingerprint__() == as_training_data(shapes).__dagfusion_fingerprint__()


def test_image_caption_data_repeats_in_seeded_passes():
    images = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 2, 2)
    data = ImageCaptionData(images, ["a", "b", "c"], seed=1)
    first = data.examples(0, 6)
    assert sorted(first.captions[:3]) == ["a", "b", "c"] and sorted(first.captions[3:]) == ["a", "b", "c"]
    assert data.examples(2, 3).captions == first.captions[2:5]  # any window is the same stream
    ordered = ImageCaptionData(images, ["a", "b", "c"], shuffle=False)
    assert ordered.examples(1, 4).captions == ("b", "c", "a", "b")
    assert torch.equal(ordered.examples(1, 1).images, images[1:2])
    with pytest.raises(ValueError, match="one caption per image"):
        ImageCaptionData(images, ["a"])


def test_adapters_and_refusals():
    class Pairs:
        def __init__(self):
            self.n = 2

    class PairsSource(TrainingData):
        def examples(self, first, count):
            return Examples(torch.zeros(count, 3, 4, 4), ("x",) * count)

        def __dagfusion_fingerprint__(self):
            return "pairs"

    with pytest.raises(TypeError, match="expected a training data source"):
        as_training_data(Pairs())
    training_data.register_adapter(lambda v: PairsSource() if isinstance(v, Pairs) else None)
    try:
        assert as_training_data(Pairs()).examples(0, 2).captions == ("x", "x")
    finally:
        training_data._ADAPTERS.pop(0)
    with pytest.raises(ValueError, match="captions"):
        Examples(torch.zeros(2, 3, 4, 4), ("x",))
