import pickle

import pytest
import torch
from torch import nn

from tmtseg.errors import CheckpointError
from tmtseg.io.checkpoint import (
    latest_valid,
    list_checkpoints,
    load_checkpoint,
    load_train_state,
    load_weights,
    save_checkpoint,
)


def _model_and_optim(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, opt


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    model, opt = _model_and_optim()
    torch.manual_seed(123)
    path = save_checkpoint(
        tmp_path,
        step=7,
        model=model,
        meta={"config": {"a": 1}},
        optimizer=opt,
        train_state={"best": 1.5, "history": []},
    )
    expected_draw = torch.rand(3)
    other, other_opt = _model_and_optim(seed=1)
    ckpt = load_checkpoint(path)
    assert ckpt.meta["step"] == 7 and ckpt.meta["config"] == {"a": 1}
    load_weights(other, ckpt.weights, source=str(path))
    state = load_train_state(path, other_opt)
    assert state["best"] == 1.5 and state["step"] == 7
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    sa, sb = opt.state_dict()["state"], other_opt.state_dict()["state"]
    for pid in sa:
        for key in sa[pid]:
            torch.testing.assert_close(torch.as_tensor(sa[pid][key]), torch.as_tensor(sb[pid][key]), rtol=0, atol=0)
    torch.testing.assert_close(torch.rand(3), expected_draw, rtol=0, atol=0)  # the RNG continues where it was saved


def test_keep_last_and_truncated_newest_is_skipped(tmp_path):
    model, opt = _model_and_optim()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step=step, model=model, meta={}, optimizer=opt, keep_last=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["iter_0000002", "iter_0000003"]
    newest = list_checkpoints(tmp_path)[-1] / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a full disk
    with pytest.warns(UserWarning, match="iter_0000003"):
        assert latest_valid(tmp_path).name == "iter_0000002"


def test_half_written_checkpoint_is_never_listed(tmp_path):
    model, opt = _model_and_optim()
    save_checkpoint(tmp_path, step=1, model=model, meta={}, optimizer=opt)
    (tmp_path / "checkpoints" / ".tmp_iter_0000002_99").mkdir()  # a save killed mid-way
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iter_0000001"]
    assert latest_valid(tmp_path).name == "iter_0000001"


def test_mismatched_checkpoint_lists_keys_and_shapes(tmp_path):
    model, _ = _model_and_optim()
    path = save_checkpoint(tmp_path, step=1, model=model, meta={})
    smaller = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(CheckpointError, match=r"2\.weight \(3, 8\) != model \(2, 8\)"):
        load_weights(smaller, load_checkpoint(path).weights, source=str(path))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_is_refused(tmp_path):
    f = tmp_path / "model.pth"
    f.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(f)
    garbage = tmp_path / "x.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="x.safetensors"):
        load_checkpoint(garbage)


def test_a_save_that_fails_half_way_leaves_no_partial_folder(tmp_path, monkeypatch):
    import tmtseg.io.checkpoint as ckpt_mod

    model, opt = _model_and_optim()
    good = save_checkpoint(tmp_path, step=1, model=model, meta={}, optimizer=opt)
    real_save_file, calls = ckpt_mod.save_file, []

    def disk_full_at_the_second_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the model file was written, the training state is not
            raise OSError(28, "No space left on device")
        real_save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt_mod, "save_file", disk_full_at_the_second_file)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, step=2, model=model, meta={}, optimizer=opt)
    assert len(calls) == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [good.name]  # no .tmp_ folder left
    assert latest_valid(tmp_path) == good
