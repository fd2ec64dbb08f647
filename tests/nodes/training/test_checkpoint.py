"""Checkpoints: safetensors + JSON only, atomic, found newest-first, pruned, optimizer state round trip."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from dagfusion.nodes.training import checkpoint as ckpt  # noqa: E402


def _optimizer():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = torch.optim.AdamW([p], lr=0.1, betas=(0.8, 0.95))
    p.grad = torch.tensor([0.5, -0.5])
    opt.step()
    return p, opt


def test_round_trip_is_exact_and_plain(tmp_path):
    p, opt = _optimizer()
    tensors, plain = ckpt.optimizer_state(opt)
    shared = torch.arange(6.0)
    weights = {"a": shared, "b": shared, "c": shared[2:4]}  # shared memory is stored twice, not refused
    generator = torch.Generator().manual_seed(3)
    path = ckpt.save(tmp_path, 7, weights=weights, ema={"a": torch.ones(2)}, optimizer=tensors,
                     state={"optimizer": plain, "rng": ckpt.pack_bytes(generator.get_state()), "total": 9})
    assert path.name == "step-00000007"
    assert sorted(f.name for f in path.iterdir()) == ["ema.safetensors", "model.safetensors", "optimizer.safetensors", "state.json"]
    document = json.loads((path / "state.json").read_text())
    assert document["step"] == 7 and document["format"] == ckpt.FORMAT
    loaded = ckpt.load(path)
    assert loaded.step == 7
    assert torch.equal(loaded.weights["b"], shared) and torch.equal(loaded.weights["c"], shared[2:4])
    assert torch.equal(loaded.ema["a"], torch.ones(2))
    restored = torch.Generator().manual_seed(0)
    restored.set_state(ckpt.unpack_bytes(loaded.state["rng"]))
    assert torch.equal(torch.rand(4, generator=restored), torch.rand(4, generator=generator))

    q = torch.nn.Parameter(p.detach().clone())
    opt2 = torch.optim.AdamW([q], lr=0.1, betas=(0.8, 0.95))
    ckpt.restore_optimizer(opt2, loaded.optimizer, loaded.state["optimizer"])
    for o, param in ((opt, p), (opt2, q)):
        param.grad = torch.tensor([0.25, 1.0])
        o.step()
    assert torch.equal(p, q)
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95)


def test_latest_resolve_and_prune(tmp_path):
    for step in (2, 10, 4):
        ckpt.save(tmp_path, step, weights={"w": torch.zeros(1)}, ema=None, optimizer={}, state={})
    (tmp_path / ".tmp-crashed").mkdir()
    (tmp_path / "step-00000099").mkdir()  # incomplete: no state.json
    assert [s for s, _ in ckpt.steps(tmp_path)] == [2, 4, 10]
    assert ckpt.latest(tmp_path).name == "step-00000010"
    assert ckpt.resolve(tmp_path) == ckpt.latest(tmp_path)
    assert ckpt.resolve(tmp_path / "step-00000004").name == "step-00000004"
    ckpt.prune(tmp_path, 2)
    assert [s for s, _ in ckpt.steps(tmp_path)] == [4, 10]
    ckpt.save(tmp_path, 10, weights={"w": torch.ones(1)}, ema=None, optimizer={}, state={})  # replaces
    assert torch.equal(ckpt.load(tmp_path / "step-00000010").weights["w"], torch.ones(1))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-") and p.name != ".tmp-crashed"]
    with pytest.raises(FileNotFoundError):
        ckpt.resolve(tmp_path / "nothing")


def test_a_foreign_folder_is_not_a_checkpoint(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a dagfusion training checkpoint"):
        ckpt.load(tmp_path)
