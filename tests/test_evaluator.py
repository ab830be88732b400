"""The Evaluator reads its trainer's settings at every call, and fills a row from chunks of the size they say."""

from __future__ import annotations

import torch
from hydra.utils import instantiate

from clbench.trainer import Trainer
from strategies.finetune import Finetune


class RecordsChunks(Finetune):
    """Records the size of every chunk ``predict`` is handed."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def predict(self, x, task_id):
        self.sizes.append(int(x.shape[0]))
        return super().predict(x, task_id)


def test_an_evaluation_setting_changed_between_rows_applies_from_the_next_row(compose_cfg):
    cfg = compose_cfg(["stream=split_digits"])
    torch.manual_seed(0)
    stream = instantiate(cfg.stream)
    model = instantiate(cfg.model, input_shape=list(stream.input_shape), head_sizes=stream.head_sizes)
    strategy = RecordsChunks()
    strategy.setup(model, stream)
    trainer = Trainer(progress=False, eval_batch_size=50, eval_chunk_mb=0)
    trainer.attach(stream, 0)
    sizes = [task.num_test for task in stream.evaluation_tasks]
    assert max(sizes) > 50  # some test set needs more than one chunk of 50

    def chunks(size: int, per_chunk: int) -> list[int]:
        return [min(per_chunk, size - start) for start in range(0, size, per_chunk)]

    trainer.evaluate(strategy, give_task_id=True)
    assert strategy.sizes == [n for size in sizes for n in chunks(size, 50)]
    strategy.sizes.clear()
    trainer.eval_batch_size = 30  # read by the evaluator at the next row, not fixed when it was made
    trainer.evaluate(strategy, give_task_id=True)
    assert strategy.sizes == [n for size in sizes for n in chunks(size, 30)]
