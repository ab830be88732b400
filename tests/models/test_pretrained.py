"""model.checkpoint and model.freeze: every clbench model loads a body from a file, heads stay new, parts freeze."""

import pytest
import torch

from clbench.models import MLP, AlexNet, ResNet18, ViT
from clbench.models.pretrained import body_state_dict, freeze_parts, read_body_state
from clbench.schema import ConfigError

SMALL = {
    MLP: ((1, 8, 8), {"hidden": [16, 12]}),
    AlexNet: ((3, 32, 32), {"channels": [4, 4, 4], "hidden": [8, 8]}),
    ResNet18: ((3, 32, 32), {"nf": 4}),
    ViT: ((1, 28, 28), {"dim": 16, "depth": 2, "num_heads": 2}),
}


def _body_equal(a, b):
    one, other = body_state_dict(a), body_state_dict(b)
    return one.keys() == other.keys() and all(torch.equal(one[k], other[k]) for k in one)


@pytest.mark.parametrize("model_cls", list(SMALL))
def test_every_model_loads_a_saved_body_and_keeps_new_heads(tmp_path, model_cls):
    shape, kwargs = SMALL[model_cls]
    torch.manual_seed(0)
    source = model_cls(shape, [5], **kwargs)
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    fresh = model_cls(shape, [2, 2], **kwargs)
    torch.manual_seed(1)
    loaded = model_cls(shape, [2, 2], checkpoint=str(path), **kwargs)
    assert not _body_equal(fresh, source)
    assert _body_equal(loaded, source)
    # the heads are the stream's (2 + 2 outputs), drawn as without a checkpoint, not the file's 5-way head
    assert [h.out_features for h in loaded.heads.heads] == [2, 2]
    assert all(torch.equal(p, q) for p, q in zip(loaded.heads.parameters(), fresh.heads.parameters(), strict=True))


def test_pretrain_and_run_checkpoint_formats_are_read(tmp_path):
    torch.manual_seed(0)
    source = ViT((1, 28, 28), [3], dim=16, depth=2, num_heads=2)
    body = body_state_dict(source)
    pretrained = {"model": body, "control_head": {"weight": torch.zeros(3, 16), "bias": torch.zeros(3)}}
    run = {"next_task": 2, "strategy": {"model": source.state_dict(), "attributes": {}}}
    for name, content in (("pretrain.pt", pretrained), ("run.pt", run), ("lightning.pt", {"state_dict": body})):
        torch.save(content, tmp_path / name)
        state = read_body_state(tmp_path / name)
        assert state.keys() == body.keys() and all(torch.equal(state[k], body[k]) for k in body), name


def test_a_checkpoint_of_another_config_is_one_line_naming_the_mismatch(tmp_path):
    torch.save(ViT((1, 28, 28), [2], dim=16, depth=2, num_heads=2).state_dict(), tmp_path / "small.pt")
    with pytest.raises(ConfigError, match=r"does not fit ViT: .*missing keys \(e\.g\. blocks\.2\.") as error:
        ViT((1, 28, 28), [2], dim=16, depth=3, num_heads=2, checkpoint=str(tmp_path / "small.pt"))
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="shape mismatches"):
        ViT((1, 28, 28), [2], dim=32, depth=2, num_heads=2, checkpoint=str(tmp_path / "small.pt"))


def test_a_missing_checkpoint_names_the_path_and_how_to_make_one(tmp_path):
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(ConfigError, match=f"model.checkpoint={missing}: no such file; make one with"):
        MLP((1, 8, 8), [2], checkpoint=str(missing))


def test_not_a_state_dict_is_refused(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ConfigError, match="holds no state dict"):
        MLP((1, 8, 8), [2], checkpoint=str(tmp_path / "list.pt"))


def test_freeze_body_heads_and_prefixes():
    model = ViT((1, 28, 28), [2, 2], dim=8, depth=11, num_heads=2, freeze=["body"])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in model.named_parameters() if name.startswith("heads.")}
    model = ViT((1, 28, 28), [2], dim=8, depth=11, num_heads=2)
    frozen = freeze_parts(model, ["blocks.1", "patch_embed"])
    # a prefix stops at a dot: blocks.1 is not blocks.10
    assert all(name.startswith(("blocks.1.", "patch_embed.")) for name in frozen)
    assert "blocks.10.mlp.fc1.weight" not in frozen and "blocks.1.mlp.fc1.weight" in frozen
    assert {name for name, p in model.named_parameters() if not p.requires_grad} == set(frozen)


def test_a_bad_freeze_name_lists_the_parts():
    with pytest.raises(ConfigError, match=r"'blokcs' names no part of ViT: use body, heads .*blocks, cls_token"):
        ViT((1, 28, 28), [2], dim=8, depth=1, num_heads=2, freeze=["blokcs"])


@pytest.mark.parametrize("strategy", ["finetune", "ewc"])
def test_a_run_from_a_checkpoint_with_a_frozen_body_trains_only_the_heads(run_tiny, tmp_path, strategy):
    """The default protocol (domain scenario, one shared head) started from a saved MLP: the body the run ends
    with is the file's, bit for bit, and the head moved; EWC's Fisher skips the frozen parameters."""
    torch.manual_seed(5)
    source = MLP((1, 28, 28), [10], hidden=[100, 100])
    torch.save(source.state_dict(), tmp_path / "mlp.pt")
    overrides = [f"strategy={strategy}", "stream.num_tasks=2", "stream.train_per_task=200", "plots=false"]
    result = run_tiny([*overrides, f"model.checkpoint={tmp_path / 'mlp.pt'}", "model.freeze=[body]"])
    assert result["status"] == "completed"
    state = torch.load(result["paths"]["checkpoint"], weights_only=False)["strategy"]["model"]
    body = body_state_dict(source)
    assert all(torch.equal(state[k], body[k]) for k in body)
    assert not torch.equal(state["heads.heads.0.weight"], source.state_dict()["heads.heads.0.weight"])


def test_a_bad_freeze_name_stops_the_cli_with_one_line_and_exit_2(tmp_path, cli_error_line):
    """(A missing checkpoint file raises the same ConfigError from the same place: see the test above.)"""
    assert "model.freeze: 'nope' names no part of MLP" in cli_error_line(["model.freeze=[nope]"], tmp_path)
    assert not list(tmp_path.glob("**/result.json"))  # stopped before training
