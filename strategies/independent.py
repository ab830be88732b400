"""One model per task: the zero-forgetting, zero-transfer reference that gives single-task accuracies."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from clbench.models import ContinualModel, reset_parameters
from clbench.strategy import Strategy, UnsupportedScenarioError
from clbench.streams import Stream, Task, TaskIds


class Independent(Strategy):
    """A separate, separately initialised model for every task, each trained on its task alone.

    All T models exist from the start, so R[i][j] for an unseen task j is that model's random-init
    accuracy (FWT is exactly 0) and a trained model never changes again (BWT is exactly 0). It reads the
    task id at test time in every scenario (``uses_task_oracle``): its diagonal is the single-task
    expert accuracy a*_j that intransigence and the L2M metrics compare against.

    It needs a stream whose evaluation sets are its training tasks (square R). Where one evaluation set spans
    every task's classes (SCoLe: 200 two-class tasks, one full test set), no task id names the model that should
    answer; reading the evaluation set's id 0 made the model of task 0, which never saw eight of the ten classes,
    answer every row (9.9 %), and any other pick (the newest model, a vote) would be a different method.
    """

    name = "independent"
    uses_task_oracle = True

    def setup(self, model: ContinualModel, stream: Stream) -> ContinualModel:
        super().setup(model, stream)
        if not stream.square:  # a pair that cannot run by design: a comparison sweep records it as skipped
            raise UnsupportedScenarioError(
                "strategy independent needs a stream evaluated on its own tasks (square R), one model answering "
                f"each; {stream.name} evaluates one set that no task's model was trained for: pick another stream"
            )
        models = [model]
        for _ in range(1, len(stream)):
            fresh = copy.deepcopy(model)
            reset_parameters(fresh)
            models.append(fresh)
        self.models = nn.ModuleList(models)
        return model

    def parameters(self, task: Task) -> Sequence[nn.Parameter]:
        assert self.stream is not None
        own = self.models[task.id]
        if self.stream.scenario == "task":
            return [*own.shared_parameters(), *own.heads.heads[task.id].parameters()]
        return list(own.parameters())

    def forward(self, x: Tensor, task_ids: TaskIds) -> Tensor:
        assert isinstance(task_ids, int), "independent trains one task at a time"
        return self.models[task_ids](x, self.head_ids(task_ids))

    def predict(self, x: Tensor, task_id: int | None) -> Tensor:
        if task_id is None:
            raise ValueError("independent needs the task id at evaluation: it keeps one model per task")
        return self.models[task_id](x, self.head_ids(task_id))

    def eval_modules(self) -> list[nn.Module]:
        return list(self.models)

    def state_dict(self) -> dict[str, Any]:
        return {"models": self.models.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.models.load_state_dict(state["models"])
