"""Selective initialisation from past checkpoints (Fisch et al. 2023, "Towards Robust and Efficient
Continual Language Learning")."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from clbench.models import ContinualModel
from clbench.strategy import Strategy
from clbench.streams import Stream, Task
from clbench.trainer import Trainer

MODES = ("zero_shot", "few_step")
SCORERS = ("auto", "head", "ncm")
INITIAL = -1
"""Candidate id of the model as set up, before any training (the checkpoints of tasks are 0, 1, ...)."""


def nearest_class_mean_accuracy(
    support_features: Tensor, support_y: Tensor, query_features: Tensor, query_y: Tensor
) -> float:
    """Accuracy (percent) of a nearest-class-mean classifier: class means of the support features, each
    query goes to the closest mean (Euclidean); classes absent from the support cannot be predicted."""
    classes = support_y.unique()
    means = torch.stack([support_features[support_y == c].mean(0) for c in classes])
    predicted = classes[torch.cdist(query_features, means).argmin(1)]
    return float((predicted == query_y).double().mean()) * 100.0


class SelectiveInit(Strategy):
    """Fine-tuning that starts every task from the stored checkpoint that scores best on it.

    After each task the model's weights are stored (no optimizer state). Before task t every candidate,
    the checkpoints of tasks 0..t-1 plus, with ``include_initial``, the model before any training (Fisch et
    al.'s default initialisation), is scored on a slice of task t; the best is loaded and then fine-tuned as
    usual. The current model is the checkpoint of task t-1, so it is always a candidate. Ties go to the
    most recent checkpoint: with no signal the method is plain fine-tuning.

    ``mode=zero_shot`` scores a candidate as it is; ``mode=few_step`` first trains a copy of it for
    ``few_steps`` steps (the trainer's optimizer, lr and batch size, plain cross-entropy) on the support
    slice. The slice: ``score_samples`` random training samples of task t as support, and as query
    ``score_samples`` samples of its validation split when there is one, else half the support is held
    out as query. The same slice, batch order and starting head serve every candidate.

    Scoring must use a head that exists for task t. In the task scenario task t's head is freshly
    initialised, so a zero-shot head accuracy would be chance for every candidate; the ``auto`` scorer then
    uses a nearest-class-mean classifier on the shared body's features (class means from the support,
    accuracy on the query): it needs no trained head, uses only what the candidates differ in, and treats
    each one identically. The class scenario gets the same rule (task t's output units are untrained). In
    the domain scenario the shared head has been trained, so ``auto`` reads the candidate's own
    predictions, as the paper's zero-shot accuracy does. After few steps the head has been trained on the
    support (starting, for every candidate, from the current model's head), so ``few_step`` reads the head.

    In the task scenario only the shared body is stored and loaded: heads stay as they are, so the heads
    of tasks learned since the chosen checkpoint are kept and task t starts from its fresh head. Elsewhere
    the whole model (shared head included) is the candidate. ``offload`` keeps checkpoints on the CPU.
    Scoring runs under its own random state, so choosing the last checkpoint changes nothing downstream.
    """

    name = "selective_init"

    def __init__(
        self,
        mode: str = "zero_shot",
        few_steps: int = 5,
        score_samples: int = 256,
        scorer: str = "auto",
        include_initial: bool = True,
        offload: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown strategy.mode {mode!r}: use one of {', '.join(MODES)}")
        if scorer not in SCORERS:
            raise ValueError(f"unknown strategy.scorer {scorer!r}: use one of {', '.join(SCORERS)}")
        if few_steps < 1:
            raise ValueError(f"strategy.few_steps must be >= 1, got {few_steps}")
        if score_samples < 2:
            raise ValueError(f"strategy.score_samples must be >= 2 (a support and a query), got {score_samples}")
        self.mode = mode
        self.few_steps = few_steps
        self.score_samples = score_samples
        self.scorer = scorer
        self.include_initial = include_initial
        self.offload = offload
        self.seed = seed
        self.checkpoints: dict[int, dict[str, Tensor]] = {}
        self.chosen: list[int] = []
        self.scores: list[dict[int, float]] = []

    # -- lifecycle -----------------------------------------------------------------------------------
    def setup(self, model: ContinualModel, stream: Stream) -> ContinualModel:
        super().setup(model, stream)
        if self.scoring_rule(stream.scenario) == "head" and self.mode == "zero_shot" and stream.scenario != "domain":
            raise ValueError(
                f"strategy.scorer=head with mode=zero_shot cannot score in the {stream.scenario} scenario: the new "
                "task's head is untrained; use strategy.scorer=ncm (or auto) or strategy.mode=few_step"
            )
        if self.include_initial:
            self.checkpoints[INITIAL] = self.snapshot()
        return model

    def scoring_rule(self, scenario: str) -> str:
        """``head`` or ``ncm``, resolving ``auto`` as the class docstring explains."""
        if self.scorer != "auto":
            return self.scorer
        return "head" if self.mode == "few_step" or scenario == "domain" else "ncm"

    def fit_task(self, task: Task, trainer: Trainer) -> None:
        self.initialise(task, trainer)
        trainer.fit(self, [task])

    def after_task(self, task: Task) -> None:
        self.checkpoints[task.id] = self.snapshot()

    # -- selection -----------------------------------------------------------------------------------
    def initialise(self, task: Task, trainer: Trainer) -> int:
        """Score the candidates on ``task``, load the best into the model, log and return its id."""
        assert self.model is not None
        candidates = sorted(k for k in self.checkpoints if k != INITIAL or self.include_initial)
        if len(candidates) <= 1:
            # nothing to choose from: the model already is the only candidate
            self.chosen.append(candidates[0] if candidates else INITIAL)
            self.scores.append({})
            return self.chosen[-1]
        scores = self.score_candidates(task, trainer, candidates)
        best = max(candidates, key=lambda k: (scores[k], k))
        self.load_into(self.model, self.checkpoints[best])
        self.chosen.append(best)
        self.scores.append(scores)
        return best

    def score_candidates(self, task: Task, trainer: Trainer, candidates: list[int]) -> dict[int, float]:
        """Accuracy (percent) on ``task``'s query slice of every candidate, zero-shot or after few steps."""
        assert self.model is not None and self.stream is not None
        support, query = self.scoring_slice(task)
        rule = self.scoring_rule(self.stream.scenario)
        device = support[0].device
        scores: dict[int, float] = {}
        scratch = copy.deepcopy(self.model)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for k in candidates:
                torch.manual_seed(self.seed * 1_000_003 + task.id)
                scratch.load_state_dict(self.model.state_dict())
                self.load_into(scratch, self.checkpoints[k])
                if self.mode == "few_step":
                    self.train_few_steps(scratch, task, trainer, support)
                scores[k] = self.accuracy(scratch, task, support, query, rule)
        return scores

    def scoring_slice(self, task: Task) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """(inputs, targets) of the support and the query, drawn with a generator seeded by task and seed."""
        assert self.stream is not None
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + task.id)
        chosen = torch.randperm(task.num_train, generator=generator)[: self.score_samples].to(task.train_index.device)
        index, targets = task.train_index[chosen], task.train_targets[chosen]
        if task.val_index.numel() > 0:
            held = torch.randperm(int(task.val_index.numel()), generator=generator)[: self.score_samples]
            held = held.to(task.val_index.device)
            query_index, query_targets = task.val_index[held], task.val_targets[held]
        else:
            half = index.numel() // 2
            index, query_index = index[:half], index[half:]
            targets, query_targets = targets[:half], targets[half:]
        inputs = self.stream.inputs
        return (inputs("train", index, task.id), targets), (inputs("train", query_index, task.id), query_targets)

    def train_few_steps(
        self, model: ContinualModel, task: Task, trainer: Trainer, support: tuple[Tensor, Tensor]
    ) -> None:
        """``few_steps`` optimizer steps on consecutive support batches (wrapping around)."""
        assert self.stream is not None
        x, y = support
        if self.stream.scenario == "task":
            params = [*model.shared_parameters(), *model.heads.heads[task.id].parameters()]
        else:
            params = list(model.parameters())
        optimizer = trainer.make_optimizer(params)
        model.train()
        size = min(trainer.batch_size, x.shape[0])
        for step in range(self.few_steps):
            rows = torch.arange(step * size, (step + 1) * size, device=x.device) % x.shape[0]
            loss = F.cross_entropy(model(x[rows], self.head_ids(task.id)), y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def accuracy(
        self,
        model: ContinualModel,
        task: Task,
        support: tuple[Tensor, Tensor],
        query: tuple[Tensor, Tensor],
        rule: str,
    ) -> float:
        model.eval()
        if rule == "ncm":
            features = model.features(support[0]), model.features(query[0])
            return nearest_class_mean_accuracy(features[0], support[1], features[1], query[1])
        predicted = model(query[0], self.head_ids(task.id)).argmax(1)
        return float((predicted == query[1]).double().mean()) * 100.0

    # -- checkpoints ---------------------------------------------------------------------------------
    def stored_keys(self) -> list[str]:
        """State-dict keys a checkpoint holds: the shared body in the task scenario, everything elsewhere."""
        assert self.model is not None and self.stream is not None
        keys = list(self.model.state_dict())
        if self.stream.scenario == "task":
            head_keys = {f"heads.{key}" for key in self.model.heads.state_dict()}
            keys = [key for key in keys if key not in head_keys]
        return keys

    def snapshot(self) -> dict[str, Tensor]:
        """A detached copy of the current weights (see ``stored_keys``), on the CPU with ``offload``."""
        assert self.model is not None
        state = self.model.state_dict()
        return {
            key: state[key].detach().to("cpu" if self.offload else state[key].device, copy=True)
            for key in self.stored_keys()
        }

    @staticmethod
    def load_into(model: ContinualModel, checkpoint: dict[str, Tensor]) -> None:
        """Overwrite the checkpoint's entries of ``model`` and keep the rest (the heads in the task scenario)."""
        state = model.state_dict()
        state.update(checkpoint)
        model.load_state_dict(state)

    # -- results and persistence ---------------------------------------------------------------------
    def extra_results(self) -> dict[str, Any]:
        """Which candidate each task started from (-1: the untrained model) and every candidate's score."""
        assert self.stream is not None
        return {
            "selective_init": {
                "mode": self.mode,
                "scorer": self.scoring_rule(self.stream.scenario),
                "chosen": list(self.chosen),
                "scores": [{str(k): v for k, v in scores.items()} for scores in self.scores],
            }
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "checkpoints": self.checkpoints,
            "chosen": list(self.chosen),
            "scores": list(self.scores),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        device = "cpu" if self.offload else next(self.model.parameters()).device  # type: ignore[union-attr]
        self.checkpoints = {
            int(k): {key: value.to(device) for key, value in ckpt.items()} for k, ckpt in state["checkpoints"].items()
        }
        self.chosen = list(state["chosen"])
        self.scores = [dict(scores) for scores in state["scores"]]
