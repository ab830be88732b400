"""Control sets (clbench/control.py): readouts on hand-made data, set-up errors before training, the values in
result.json / the checkpoint / W&B, and a resumed run that keeps them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from clbench.control import ControlRecord, ControlSet
from clbench.data.base import ImageDataset
from clbench.models.heads import ContinualModel, MultiHead
from clbench.schema import ConfigError
from clbench.strategy import Strategy
from clbench.streams import split_stream
from clbench.trainer import Trainer

# three classes of 1x1x2 images whose two pixels point three different ways: (255, 0), (0, 255), (255, 255)
PATTERNS = torch.tensor([[255, 0], [0, 255], [255, 255]], dtype=torch.uint8)


def _images(labels: Tensor) -> Tensor:
    return PATTERNS[labels].view(-1, 1, 1, 2)


def toy_dataset(name: str = "toy", mislabelled: int = 0) -> ImageDataset:
    """10 train and 10 test images per class; the first ``mislabelled`` test images of class 2 say class 0."""
    y = torch.arange(3).repeat_interleave(10)
    y_test = y.clone()
    y_test[20 : 20 + mislabelled] = 0
    return ImageDataset(name, _images(y), y, _images(y), y_test, ("a", "b", "c"))


class Flat(ContinualModel):
    """features(x) = the normalised pixels themselves."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = MultiHead(2, [3])

    def features(self, x: Tensor) -> Tensor:
        return x.flatten(1)


def toy_stream(dataset: ImageDataset):
    return split_stream(dataset, num_tasks=1, classes_per_task=3)


def measure(control: ControlSet, model: ContinualModel, strategy: type[Strategy] = Strategy, **trainer) -> float:
    """The control accuracy of ``model`` in a fine-tuning strategy (or ``strategy``), with these trainer settings."""
    learner = strategy()
    learner.setup(model, toy_stream(control.dataset))
    return control.accuracy(learner, Trainer(progress=False, **trainer))


def save_head(
    path: Path, weight: Tensor, bias: Tensor, classes: list[int], dataset: str = "toy", body: dict | None = None
) -> Path:
    """A pretraining checkpoint in the issue-23 contract's format (the control set reads only its head)."""
    torch.save(
        {
            "model": body or {},
            "control_head": {"weight": weight, "bias": bias},
            "classes": classes,
            "dataset": dataset,
            "config": {},
            "test_accuracy": None,
        },
        path,
    )
    return path


def test_ncm_readout_counts_the_mislabelled_images_wrong():
    dataset = toy_dataset(mislabelled=4)
    control = ControlSet(name="toy", dataset=dataset, readout="ncm", ncm_per_class=5)
    control.prepare(Flat(), toy_stream(dataset))
    # the three patterns point three ways, so NCM gets every image right but the 4 that carry a wrong label
    assert measure(control, Flat()) == pytest.approx(100.0 * 26 / 30)


def test_head_readout_reads_the_checkpoint_head_and_a_subset_of_its_classes(tmp_path):
    dataset = toy_dataset()
    # row k of the head votes for the pixel pattern of class classes[k]; row order is not label order
    classes = [2, 0, 1]
    weight = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0]])
    path = save_head(tmp_path / "pre.pt", weight, torch.zeros(3), classes)
    control = ControlSet(name="toy", dataset=dataset, checkpoint=str(path))
    control.prepare(Flat(), toy_stream(dataset))
    x = (dataset.x_test.float() / 255 - dataset.mean[0]) / dataset.std[0]
    expected = torch.tensor(classes)[(x.flatten(1) @ weight.T).argmax(1)] == dataset.y_test
    assert measure(control, Flat()) == pytest.approx(100.0 * float(expected.float().mean()))
    # a model that forgot everything (features all zero): the head's ties go to row 0 (class 2): a third right
    assert measure(control, _Blind()) == pytest.approx(100.0 / 3)

    narrowed = ControlSet(name="toy", dataset=dataset, checkpoint=str(path), classes=[0, 1])
    narrowed.prepare(Flat(), toy_stream(dataset))
    assert narrowed.describe()["num_test"] == 20
    assert measure(narrowed, _Blind()) == pytest.approx(50.0)  # ties go to the first of the two rows: class 0


class _Blind(Flat):
    def features(self, x: Tensor) -> Tensor:
        return torch.zeros(x.shape[0], 2)


class _BlindWhileTraining(Flat):
    """Sees the pixels in eval mode, nothing in training mode (a layer whose training-mode output is useless)."""

    def features(self, x: Tensor) -> Tensor:
        return torch.zeros(x.shape[0], 2) if self.training else x.flatten(1)


class _EvaluatesOnlyTheHeads(Strategy):
    """A strategy whose evaluation leaves the body in training mode: its eval_modules are the heads alone."""

    def eval_modules(self) -> list[nn.Module]:
        assert self.model is not None
        return [self.model.heads]


@pytest.mark.parametrize("readout", ["head", "ncm"])
def test_control_set_is_evaluated_in_the_strategys_eval_modes_as_r_is(tmp_path, readout):
    """The control set goes through the evaluator that fills R: the strategy's eval_modules() are switched to
    eval mode, not model.eval(). A body the strategy keeps in training mode is blind here, so the head's ties
    give class 2 (a third right) and NCM's all-zero features give class 0 (a third). It used to be measured in
    model.eval(), seeing the pixels (100 %), unlike R. The modes are as before afterwards."""
    dataset = toy_dataset()
    path = save_head(
        tmp_path / "pre.pt", torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0]]), torch.zeros(3), [2, 0, 1]
    )
    control = ControlSet(name="toy", dataset=dataset, readout=readout, checkpoint=str(path), ncm_per_class=5)
    control.prepare(Flat(), toy_stream(dataset))
    assert measure(control, _BlindWhileTraining().eval()) == pytest.approx(100.0)
    model = _BlindWhileTraining().train()
    assert measure(control, model, _EvaluatesOnlyTheHeads) == pytest.approx(100.0 / 3)
    assert model.training and model.heads.training


class _Linear(Flat):
    """features(x) through a linear layer, recording the dtype each call's features come out in."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(2, 2)
        with torch.no_grad():
            self.body.weight.copy_(torch.eye(2))
            self.body.bias.zero_()
        self.seen: list[torch.dtype] = []

    def features(self, x: Tensor) -> Tensor:
        out = self.body(x.flatten(1))
        self.seen.append(out.dtype)
        return out


@pytest.mark.parametrize("readout", ["head", "ncm"])
def test_control_set_is_evaluated_at_the_precision_of_r(tmp_path, readout):
    """Under trainer.eval_amp=bf16 the control set's features (and the NCM sample's) come from a bf16 autocast
    forward pass as R's logits do; without it, fp32. It used to be fp32 whatever eval_amp said."""
    dataset = toy_dataset(mislabelled=4)
    path = save_head(
        tmp_path / "pre.pt", torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]]), torch.zeros(3), [0, 1, 2]
    )
    control = ControlSet(name="toy", dataset=dataset, readout=readout, checkpoint=str(path), ncm_per_class=5)
    control.prepare(_Linear(), toy_stream(dataset))
    exact, rounded = _Linear(), _Linear()
    fp32 = measure(control, exact)
    assert set(exact.seen) == {torch.float32}
    assert measure(control, rounded, eval_amp="bf16") == fp32  # the toy's classes are far apart
    assert set(rounded.seen) == {torch.bfloat16}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"checkpoint": None}, "readout=head needs the pretraining checkpoint"),
        ({"checkpoint": "missing.pt"}, "is not a file"),
        ({"classes": [5]}, "control.classes must list distinct classes of toy"),
        ({"head_dataset": "other"}, "was trained on other"),
        ({"head_width": 3}, "the control head reads 3 features, the model gives 2"),
        ({"classes": [0, 1], "head_classes": [1, 2]}, "control.classes [0] are not among the control head's"),
    ],
)
def test_bad_control_settings_are_one_config_error(tmp_path, change, message):
    dataset = toy_dataset()
    width, head_classes = change.get("head_width", 2), change.get("head_classes", [0, 1, 2])
    path = save_head(
        tmp_path / "pre.pt",
        torch.ones(len(head_classes), width),
        torch.zeros(len(head_classes)),
        head_classes,
        change.get("head_dataset", "toy"),
    )
    checkpoint = change.get("checkpoint", str(path))
    control = ControlSet(name="toy", dataset=dataset, checkpoint=checkpoint, classes=change.get("classes"))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        control.prepare(Flat(), toy_stream(dataset))


def test_record_summarises_and_resumes_with_gaps():
    record = ControlRecord(ControlSet(name="toy", dataset=toy_dataset(), readout="ncm"))
    record.before, record.after_task = 80.0, [78.0, 75.5]
    assert record.metrics() == {"control_acc_final": 75.5, "control_change": -4.5}
    resumed = ControlRecord(record.control)
    resumed.load_state_dict({"control_acc_before": 80.0, "control_acc": [78.0]}, tasks_done=3)
    assert resumed.after_task == [78.0, None, None] and resumed.before == 80.0
    assert ControlRecord(None).metrics() == {} and ControlRecord(None).result_fields(2) == {}


# -- end to end: a pretraining checkpoint of an MLP on Fashion-MNIST classes 0-4 ------------------------------------
FMNIST_STREAM = [
    "stream=split_fashion_mnist",
    "stream.num_tasks=2",
    "stream.classes_per_task=2",
    "+stream.class_order=[5,6,7,8,9,0,1,2,3,4]",
    "stream.train_per_task=300",
]


@pytest.fixture(scope="module")
def fmnist_checkpoint(tmp_path_factory) -> Path:
    """An MLP 784-100-100 trained briefly on Fashion-MNIST classes 0-4, saved in the contract's format."""
    from clbench.data import load_fashion_mnist
    from clbench.models import MLP

    dataset = load_fashion_mnist()
    torch.manual_seed(0)
    model = MLP([1, 28, 28], [5])
    chosen = torch.nonzero(dataset.y_train < 5).flatten()[:1500]
    x = (dataset.x_train[chosen].float() / 255 - dataset.mean[0]) / dataset.std[0]
    y = dataset.y_train[chosen]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        for part in torch.randperm(len(y)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[part]), y[part]).backward()
            optimizer.step()
    head = model.heads.heads[0]
    path = tmp_path_factory.mktemp("pretrain") / "mlp_fmnist0-4.pt"
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("heads.")}
    return save_head(path, head.weight.detach(), head.bias.detach(), [0, 1, 2, 3, 4], "fashion_mnist", body)


def _control(path: Path) -> list[str]:
    return ["control=pretrained_fmnist", f"control.checkpoint={path}"]


def test_result_json_holds_a_control_value_per_row_of_r(run_tiny, fmnist_checkpoint, tmp_path):
    result = run_tiny([*FMNIST_STREAM, *_control(fmnist_checkpoint)], tmp_path)
    stored = json.loads(Path(result["paths"]["result"]).read_text())
    assert len(stored["control_acc"]) == len(stored["acc_matrix"]) == 2
    assert all(0.0 <= value <= 100.0 for value in [stored["control_acc_before"], *stored["control_acc"]])
    assert stored["control"]["num_test"] == 5000 and stored["control"]["dataset"] == "fashion_mnist"
    final, before = stored["control_acc"][-1], stored["control_acc_before"]
    assert stored["metrics"]["control_change"] == pytest.approx(final - before)
    assert stored["metrics"]["control_acc_final"] == final
    checkpoint = torch.load(Path(result["paths"]["checkpoint"]), weights_only=False)
    assert checkpoint["control_acc"] == stored["control_acc"] and checkpoint["control_acc_before"] == before


def test_no_control_set_leaves_result_json_as_before(run_tiny, tmp_path):
    result = run_tiny(["stream=split_digits", "stream.num_tasks=2"], tmp_path)
    assert not [key for key in result if key.startswith("control")]
    assert "control_change" not in result["metrics"]


def test_resumed_run_keeps_the_control_values(run_tiny, fmnist_checkpoint, tmp_path, interrupt_after_first_checkpoint):
    from clbench.runner import RunInterrupted

    overrides = [*FMNIST_STREAM, *_control(fmnist_checkpoint), "deterministic=true"]
    clean = run_tiny(overrides, tmp_path / "clean")
    with interrupt_after_first_checkpoint(), pytest.raises(RunInterrupted):
        run_tiny(overrides, tmp_path / "killed")
    resumed = run_tiny(overrides, tmp_path / "killed")
    assert resumed["control_acc_before"] == clean["control_acc_before"]
    assert resumed["control_acc"] == clean["control_acc"]


class _FakeWandbRun:
    def __init__(self) -> None:
        self.summary: dict = {}
        self.logged: list[tuple[dict, int]] = []

    def log(self, payload: dict, step: int) -> None:
        self.logged.append((payload, step))


def test_wandb_logs_control_before_in_summary_and_each_task_at_its_step():
    from clbench.loggers.wandb import WandbLogger

    logger = WandbLogger(mode="disabled")
    logger.run = _FakeWandbRun()
    logger.log_control(None, 80.0)
    logger.log_control(0, 77.5)
    logger.log_control(1, None)  # a resumed run's row from before the control set: nothing to log
    assert logger.run.summary == {"control_acc_before": 80.0}
    assert logger.run.logged == [({"control_acc": 77.5, "task": 0, "control_change": -2.5}, 0)]


def test_every_control_value_reaches_the_loggers(run_tiny, fmnist_checkpoint, tmp_path, monkeypatch):
    from clbench.loggers.wandb import WandbLogger

    seen: list[tuple[int | None, float | None]] = []
    original = WandbLogger.log_control

    def recording(self, task_id, accuracy):
        seen.append((task_id, accuracy))
        original(self, task_id, accuracy)

    monkeypatch.setattr(WandbLogger, "log_control", recording)
    result = run_tiny([*FMNIST_STREAM, *_control(fmnist_checkpoint), "logger=wandb", "logger.mode=offline"], tmp_path)
    assert seen == [(None, result["control_acc_before"]), *enumerate(result["control_acc"])]


def test_bad_control_config_is_one_line_and_exit_2(tmp_path, cli_error_line):
    overrides = [*FMNIST_STREAM, "control=pretrained_fmnist", f"control.checkpoint={tmp_path / 'nowhere.pt'}"]
    line = cli_error_line(overrides, tmp_path)
    assert "control.checkpoint=" in line and "is not a file" in line
    assert not list(tmp_path.glob("split_fashion_mnist/*/*/checkpoint.pt"))


def test_the_control_set_does_not_change_training(run_tiny, fmnist_checkpoint, tmp_path):
    """Measured in eval mode without gradients or random draws: R is the same with and without it."""
    overrides = [*FMNIST_STREAM, "deterministic=true"]
    plain = run_tiny(overrides, tmp_path / "plain")
    measured = run_tiny([*overrides, *_control(fmnist_checkpoint)], tmp_path / "measured")
    assert measured["acc_matrix"] == plain["acc_matrix"] and "control_acc" in measured
