"""The step-hook contract: run reports, guidance halves, checked hook classes and patch keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from dagfusion.errors import NodeDefinitionError  # noqa: E402
from dagfusion.model import (  # noqa: E402
    DenoiserCall,
    FunctionPatch,
    ModelHandle,
    ModelPatch,
    RunReport,
    StepHook,
    StepInfo,
    count_macs,
    patch_key,
)
from dagfusion.nodes.diffusion.sampling import run_sampling, sample  # noqa: E402

STEPS = 4


@pytest.fixture(scope="module")
def parts() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return tiny.sd_handles()


def options(**changes: Any) -> dict[str, Any]:
    return {"steps": STEPS, "guidance_scale": 4.0, "seed": 2, "sampler": "euler", **changes}


class SkipOdd(ModelPatch):
    """Reuses the previous output on odd steps and reports how often."""

    key = "tests.report.skip-odd"

    def begin(self, run: Any) -> StepHook:
        class Hook(StepHook):
            def __init__(self) -> None:
                self.last = None
                self.reused = 0

            def denoise(self, call: Any, forward: Any) -> Any:
                if call.step.index % 2 and self.last is not None:
                    self.reused += 1
                    return self.last
                self.last = forward(call)
                return self.last

            def end(self) -> dict[str, Any]:
                return {"reused": self.reused, "steps": (1, 2)}

        return Hook()


# --- run reports ----------------------------------------------------------------------------------


def test_the_report_records_every_step_and_each_patchs_statistics(parts: dict[str, Any]) -> None:
    model = parts["model"].with_patch(SkipOdd())
    latent, report = run_sampling(model, parts["conditioning"], parts["latent"], **options())
    assert torch.equal(latent.samples, sample(model, parts["conditioning"], parts["latent"], **options()).samples)
    assert [s.index for s in report.steps] == list(range(STEPS))
    assert [s.computed for s in report.steps] == [True, False, True, False]
    assert [s.denoiser_calls for s in report.steps] == [1, 0, 1, 0]
    assert (report.computed_steps, report.skipped_steps) == (2, 2)
    assert report.patch(SkipOdd.key) == {"reused": 2, "steps": [1, 2]}  # plain data: tuples become lists
    assert all(s.seconds >= 0 for s in report.steps) and report.seconds == sum(s.seconds for s in report.steps)
    # MACs: a computed step costs exactly one batched forward, a reused one nothing.
    unet = parts["model"].denoiser
    rows = 2 * parts["latent"].samples.shape[0]  # both guidance halves
    x = torch.zeros((rows, *parts["latent"].samples.shape[1:]))
    text = parts["conditioning"].positive["encoder_hidden_states"]
    with torch.no_grad(), count_macs(unet) as counter:
        unet(x, 10, encoder_hidden_states=text.expand(rows, *text.shape[1:]))
    assert [s.macs for s in report.steps] == [counter.total, 0, counter.total, 0]
    assert report.macs == 2 * counter.total and report.info["macs_counted"] is True
    with pytest.raises(KeyError, match="tests.report.skip-odd"):
        report.patch("nope")


def test_counting_can_be_turned_off_and_hooks_without_a_report_are_absent(parts: dict[str, Any]) -> None:
    model = parts["model"].with_patch(FunctionPatch(lambda call, forward: forward(call), key="tests.report.plain"))
    _, report = run_sampling(model, parts["conditioning"], parts["latent"], count_macs=False, **options())
    assert report.patches == {} and report.macs is None
    assert all(s.macs is None and s.computed for s in report.steps)


def test_reports_must_be_plain_data_and_repeated_keys_are_kept_apart(parts: dict[str, Any]) -> None:
    @dataclass(frozen=True)
    class Stats:
        count: int
        ratio: float

    class Typed(ModelPatch):
        key = "tests.report.typed"

        def begin(self, run: Any) -> StepHook:
            class Hook(StepHook):
                def end(self) -> Stats:
                    return Stats(3, 0.5)

            return Hook()

    model = parts["model"].with_patch(Typed()).with_patch(Typed())
    _, report = run_sampling(model, parts["conditioning"], parts["latent"], **options(steps=1))
    assert report.patches == {"tests.report.typed": {"count": 3, "ratio": 0.5},
                              "tests.report.typed#2": {"count": 3, "ratio": 0.5}}

    class Leaky(ModelPatch):
        key = "tests.report.leaky"

        def begin(self, run: Any) -> StepHook:
            class LeakyHook(StepHook):
                def end(self) -> Any:
                    return {"tensor": torch.zeros(1)}

            return LeakyHook()

    with pytest.raises(TypeError, match=r"LeakyHook.*Leaky.*plain data.*Tensor"):
        run_sampling(parts["model"].with_patch(Leaky()), parts["conditioning"], parts["latent"], **options(steps=1))


def test_the_report_survives_its_serializer(parts: dict[str, Any], tmp_path: Any) -> None:
    from dagfusion.fingerprint import fingerprint
    from dagfusion.nodes.diffusion.types import RUN_REPORT

    _, report = run_sampling(parts["model"].with_patch(SkipOdd()), parts["conditioning"], parts["latent"], **options())
    path = str(tmp_path / "report")
    RUN_REPORT.serializer.save(report, path)
    loaded = RUN_REPORT.serializer.load(path)
    assert isinstance(loaded, RunReport) and loaded == report
    assert fingerprint(loaded) == fingerprint(report)
    # Timings are measurements, not content: they do not change the fingerprint.
    again = RunReport(tuple(s.__class__(s.index, s.timestep, s.denoiser_calls, s.macs, 9.0) for s in report.steps),
                      report.patches, report.info)
    assert fingerprint(again) == fingerprint(report)
    with pytest.raises(ValueError, match="run report"):
        RunReport.from_dict({"format": 99})


# --- guidance halves --------------------------------------------------------------------------------


class CondOnlyAfter(ModelPatch):
    """Computes the unconditional half only on the first steps, then reuses it."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction
        self.key = f"tests.report.cond-only:{fraction}"

    def begin(self, run: Any) -> StepHook:
        fraction = self.fraction

        class Hook(StepHook):
            def __init__(self) -> None:
                self.uncond = None
                self.seen: list[tuple[str, ...]] = []

            def denoise(self, call: Any, forward: Any) -> Any:
                if "uncond" not in call.batches or (call.step.fraction < fraction or self.uncond is None):
                    out = forward(call)
                    if "uncond" in call.batches:
                        self.uncond = call.split(out)["uncond"]
                    return out
                return call.merge({"uncond": self.uncond, "cond": forward(call.select("cond"))})

        return Hook()


class SeenBatches(ModelPatch):
    """An inner hook recording the batch halves and sizes it sees."""

    def __init__(self, seen: list[tuple[tuple[str, ...], int]]) -> None:
        self.seen = seen
        self.key = f"tests.report.seen:{id(seen)}"

    def begin(self, run: Any) -> StepHook:
        seen = self.seen

        class Hook(StepHook):
            def denoise(self, call: Any, forward: Any) -> Any:
                seen.append((call.batches, int(call.sample.shape[0])))
                return forward(call)

        return Hook()


def test_select_gives_inner_hooks_one_half_and_merge_joins_the_output(parts: dict[str, Any]) -> None:
    seen: list[tuple[tuple[str, ...], int]] = []
    model = parts["model"].with_patch(CondOnlyAfter(0.5)).with_patch(SeenBatches(seen))
    latent, report = run_sampling(model, parts["conditioning"], parts["latent"], **options())
    assert seen == [(("uncond", "cond"), 2)] * 2 + [(("cond",), 1)] * 2
    plain, plain_report = run_sampling(parts["model"], parts["conditioning"], parts["latent"], **options())
    assert torch.isfinite(latent.samples).all() and not torch.equal(latent.samples, plain.samples)
    full = plain_report.steps[0].macs
    assert [s.macs for s in report.steps[:2]] == [full, full]
    assert all(0 < s.macs < full for s in report.steps[2:])
    # With the fraction at 1 nothing is reused: exactly the plain run.
    same = sample(parts["model"].with_patch(CondOnlyAfter(1.0)), parts["conditioning"], parts["latent"], **options())
    assert torch.equal(same.samples, plain.samples)


def test_select_slices_every_batched_input_and_keeps_the_rest() -> None:
    sample_ = torch.arange(8.0).reshape(4, 2)
    kwargs = {"encoder_hidden_states": torch.arange(12.0).reshape(4, 3),
              "added_cond_kwargs": {"text_embeds": torch.arange(4.0).reshape(4, 1), "time_ids": [torch.ones(4, 2)]},
              "cross_attention_kwargs": {"scale": 0.5}, "mask": torch.ones(3, 4)}
    call = DenoiserCall(StepInfo(0, 1, torch.tensor(5), 5.0), None, sample_, torch.tensor([5, 5, 5, 5]), kwargs,
                        ("uncond", "cond"), "unet")
    cond = call.select("cond")
    assert cond.batches == ("cond",) and call.rows == 2 and cond.rows == 2
    assert torch.equal(cond.sample, sample_[2:]) and torch.equal(cond.timestep, torch.tensor([5, 5]))
    assert torch.equal(cond.kwargs["encoder_hidden_states"], kwargs["encoder_hidden_states"][2:])
    assert torch.equal(cond.kwargs["added_cond_kwargs"]["text_embeds"], torch.tensor([[2.0], [3.0]]))
    assert cond.kwargs["added_cond_kwargs"]["time_ids"][0].shape == (2, 2)
    assert cond.kwargs["cross_attention_kwargs"] == {"scale": 0.5} and cond.kwargs["mask"] is kwargs["mask"]
    assert cond.select("cond") is cond
    halves = call.split(sample_)
    assert torch.equal(call.merge(halves), sample_)
    assert torch.equal(call.merge({"cond": halves["cond"], "uncond": halves["uncond"]}), sample_)  # batches order
    scalar = call.replace(timestep=torch.tensor(7))
    assert scalar.select("uncond").timestep is scalar.timestep  # a scalar timestep is shared
    with pytest.raises(ValueError, match=r"halves are \['uncond', 'cond'\]; there is no 'neg'"):
        call.select("neg")
    with pytest.raises(ValueError, match="merge needs one output for each"):
        call.merge({"cond": halves["cond"]})
    with pytest.raises(ValueError, match="4 rows"):
        call.split(sample_[:3])


# --- checked declarations ------------------------------------------------------------------------


def test_a_misspelt_hook_method_fails_when_the_class_is_defined() -> None:
    with pytest.raises(NodeDefinitionError, match=r"Typo defines 'denoize'.*did you mean 'denoise'\?"):
        class Typo(StepHook):
            def denoize(self, call: Any, forward: Any) -> Any:
                return forward(call)

    with pytest.raises(NodeDefinitionError, match=r"Helper defines 'stats'.*leading '_'"):
        class Helper(StepHook):
            def stats(self) -> dict[str, Any]:
                return {}

    class Fine(StepHook):
        limit = 3  # data attributes, private helpers and nested classes are fine

        class Config:
            pass

        def _stats(self) -> dict[str, Any]:
            return {}

        def end(self) -> dict[str, Any]:
            return self._stats()


def test_patches_need_a_key_from_their_settings(parts: dict[str, Any]) -> None:
    class NoKey(ModelPatch):
        def begin(self, run: Any) -> StepHook:
            return StepHook()

    with pytest.raises(NodeDefinitionError, match=r"NoKey has no key"):
        parts["model"].with_patch(NoKey())
    with pytest.raises(NodeDefinitionError, match="has no key"):
        ModelHandle(parts["model"].ref, patches=[NoKey()])

    class DuckTyped:
        def begin(self, run: Any) -> None:
            return None

    with pytest.raises(NodeDefinitionError, match="DuckTyped has no key"):
        parts["model"].with_patch(DuckTyped())
    with pytest.raises(NodeDefinitionError, match="needs key="):
        FunctionPatch(lambda call, forward: forward(call))

    @dataclass(frozen=True)
    class Settings:
        strength: float = 0.5
        steps: tuple[int, ...] = (1, 2)

    class Configured(ModelPatch):
        def __init__(self, config: Settings) -> None:
            self.config = config

    a, b = Configured(Settings()), Configured(Settings(strength=0.7))
    assert patch_key(a) != patch_key(b) and patch_key(a) == patch_key(Configured(Settings()))
    assert "Configured" in a.key and '"strength":0.5' in a.key
    from dagfusion.fingerprint import fingerprint

    assert fingerprint(parts["model"].with_patch(a)) != fingerprint(parts["model"].with_patch(b))

    @dataclass
    class Mutable:
        strength: float = 0.5

    with pytest.raises(NodeDefinitionError, match="frozen dataclass"):
        parts["model"].with_patch(Configured(Mutable()))  # type: ignore[arg-type]
