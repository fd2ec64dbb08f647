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
    adapter = lambda v: PairsSource() if isinstance(v, Pairs) else None  # noqa: E731
    training_data.register_adapter(adapter)
    try:
        assert as_training_data(Pairs()).examples(0, 2).captions == ("x", "x")
        training_data.register_adapter(adapter)  # again: changes nothing
        assert training_data._ADAPTERS.count(adapter) == 1 and training_data._ADAPTERS[0] is adapter
    finally:
        training_data._ADAPTERS.remove(adapter)
    with pytest.raises(ValueError, match="captions"):
        Examples(torch.zeros(2, 3, 4, 4), ("x",))


def test_the_pack_registers_its_adapters_through_a_register_callback():
    from dagfusion.nodes.training import register_data_adapters

    collected = []
    register_data_adapters(collected.append)
    assert collected == [training_data.batch_source_adapter]
    as_training_data(ImageCaptionData(torch.zeros(1, 3, 2, 2), ["a"]))  # loads the built-ins
    assert training_data._ADAPTERS[-1] is training_data.batch_source_adapter  # asked last

    class Batches:
        def batch(self, first, count):
            return {"images": torch.zeros(count, 3, 2, 2), "captions": ["c"] * count}

    assert training_data.batch_source_adapter(object()) is None
    assert isinstance(as_training_data(Batches()), training_data.BatchSource)


def test_a_plugin_hook_function_registers_adapters_before_the_builtin_rule():
    class Pairs:
        pass

    source = ImageCaptionData(torch.zeros(1, 3, 2, 2), ["p"])

    def register_data_adapters(register):  # a plugin's hook implementation
        register(lambda v: source if isinstance(v, Pairs) else None)

    training_data._ensure_builtins()  # the built-in adapters are in place before the snapshot
    before = list(training_data._ADAPTERS)
    register_data_adapters(register=training_data.adapter_registrar())
    try:
        assert as_training_data(Pairs()) is source
        assert training_data._ADAPTERS[-1] is training_data.batch_source_adapter
    finally:
        training_data._ADAPTERS[:] = before
