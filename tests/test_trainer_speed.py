"""The runner's fast paths: per-batch input transforms, batched evaluation of R, and the trainer's speed
switches (bf16 autocast, channels-last, torch.compile, CPU threads). Each must give what the plain path
gives, or differ only where the switch says it does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from clbench.trainer import Trainer
from strategies.finetune import Finetune
from strategies.gradient_projection import GPM


def build(compose_cfg, overrides, strategy=None, **trainer_kwargs):
    cfg = compose_cfg(overrides)
    torch.manual_seed(0)
    stream = instantiate(cfg.stream)
    model = instantiate(cfg.model, input_shape=list(stream.input_shape), head_sizes=stream.head_sizes)
    strategy = strategy or Finetune()
    strategy.setup(model, stream)
    trainer = Trainer(progress=False, batch_size=32, **trainer_kwargs)
    trainer.attach(stream, 0)
    return strategy, stream, trainer


PERMUTED = ["stream=permuted_mnist5k", "stream.num_tasks=3", "stream.train_per_task=300"]


def reference_inputs(stream, split, index, task_id):
    """The transform written out the slow, obvious way: gather, scale to [0, 1], permute, normalise."""
    pool = stream.x_train if split == "train" else stream.x_test
    x = pool[index].float() / 255.0
    flat = x.flatten(1)[:, stream.permutations[task_id]]
    return ((flat - stream.mean[task_id, 0]) / stream.std[task_id, 0]).view_as(x)


def test_fused_permuted_inputs_equal_the_written_out_transform(compose_cfg):
    _, stream, _ = build(compose_cfg, PERMUTED)
    for task in stream:
        index = task.train_index[:50]
        expected = reference_inputs(stream, "train", index, task.id)
        torch.testing.assert_close(stream.inputs("train", index, task.id), expected, rtol=1e-5, atol=1e-5)
        mixed = torch.full((50,), task.id, dtype=torch.long)
        torch.testing.assert_close(stream.inputs("train", index, mixed), expected, rtol=1e-5, atol=1e-5)


def test_batched_row_equals_task_by_task_row(compose_cfg):
    strategy, stream, trainer = build(compose_cfg, PERMUTED, eval_batch_size=256, eval_chunk_mb=0)
    trainer.fit(strategy, [stream.tasks[0]])
    batched = trainer.evaluate(strategy, give_task_id=False)
    trainer.batched_eval = False
    per_task = trainer.evaluate(strategy, give_task_id=False)
    assert batched == pytest.approx(per_task, abs=1e-9)
    assert len(set(per_task)) > 1  # the tasks really differ, so a mix-up of owners would show


@pytest.mark.parametrize("eval_batch_size", [7, 256, 5000])
def test_batched_chunks_straddling_tasks_build_inputs_one_task_at_a_time(compose_cfg, eval_batch_size):
    """Chunks that span several test sets (7 and 256 do not divide 1,000; 5,000 holds all three) give the
    task-by-task row, and every input transform sees one task id, never a per-sample table."""
    strategy, stream, trainer = build(compose_cfg, PERMUTED, eval_batch_size=eval_batch_size, eval_chunk_mb=0)
    trainer.fit(strategy, [stream.tasks[0]])
    trainer.batched_eval = False
    per_task = trainer.evaluate(strategy, give_task_id=False)
    trainer.batched_eval = True
    original, seen = stream.inputs, []

    def single_task_inputs(split, index, task_ids, **kwargs):
        assert isinstance(task_ids, int), "the batched row gathered a per-sample transform table"
        seen.append((task_ids, int(index.numel())))
        return original(split, index, task_ids, **kwargs)

    stream.inputs = single_task_inputs
    batched = trainer.evaluate(strategy, give_task_id=False)
    assert batched == pytest.approx(per_task, abs=1e-9)
    assert sum(count for _, count in seen) == sum(t.num_test for t in stream.tasks)
    assert {task for task, _ in seen} == {0, 1, 2}


def test_batched_evaluation_is_not_used_when_the_task_id_is_given(compose_cfg):
    strategy, stream, trainer = build(compose_cfg, ["stream=split_digits"])
    trainer.evaluator._batched_row = lambda *_: pytest.fail("task-aware evaluation must go task by task")
    assert len(trainer.evaluate(strategy, give_task_id=True)) == len(stream)


def test_bf16_autocast_runs_the_forward_in_bf16_and_keeps_parameters_fp32(compose_cfg):
    strategy, stream, trainer = build(compose_cfg, PERMUTED, amp="bf16", eval_amp="bf16", lr=0.1, epochs=3)
    seen = []
    forward = strategy.forward
    strategy.forward = lambda x, ids: seen.append(forward(x, ids)) or seen[-1]
    losses = trainer.fit(strategy, [stream.tasks[0]])
    assert seen[0].dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in strategy.model.parameters())
    row = trainer.evaluate(strategy, give_task_id=False)
    assert losses[-1] < losses[0] and row[0] > 50.0  # it learned task 0


def test_eval_amp_changes_only_evaluation_precision(compose_cfg):
    strategy, stream, trainer = build(compose_cfg, PERMUTED)
    trainer.fit(strategy, [stream.tasks[0]])
    exact = trainer.evaluate(strategy, give_task_id=False)
    trainer.eval_amp = "bf16"
    approximate = trainer.evaluate(strategy, give_task_id=False)
    assert approximate == pytest.approx(exact, abs=2.0)


@pytest.mark.parametrize("key", ["amp", "eval_amp"])
def test_unknown_precision_names_the_choices(key):
    with pytest.raises(ValueError, match=rf"trainer\.{key} 'fp8'.*bf16"):
        Trainer(**{key: "fp8"})


def test_unknown_compile_mode_names_the_choices():
    with pytest.raises(ValueError, match=r"trainer\.compile 'fast'.*reduce-overhead"):
        Trainer(compile="fast")


def test_channels_last_inputs_with_gpm_projection_on_a_conv_net(compose_cfg):
    """NHWC inputs reach the convolutions, and GPM's projected gradients stay orthogonal to the bases."""
    overrides = [
        "stream=synthetic",
        "stream.num_tasks=2",
        "stream.dataset.num_classes=4",
        "stream.dataset.shape=[3,32,32]",
        "stream.dataset.train_per_class=24",
        "model=alexnet",
        "model.channels=[8,8,8]",
        "model.hidden=[16,16]",
    ]
    strategy, stream, trainer = build(compose_cfg, overrides, strategy=GPM(threshold=0.9), channels_last=True)
    layouts = []
    first_conv = next(m for m in strategy.model.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_pre_hook(
        lambda _m, inputs: layouts.append(inputs[0].is_contiguous(memory_format=torch.channels_last))
    )
    trainer.fit(strategy, [stream.tasks[0]], epochs=1)
    assert layouts and all(layouts)  # every training batch
    strategy.after_task(stream.tasks[0])
    captured = {}
    step = strategy.after_backward

    def after_backward(task):
        step(task)
        captured.update({i: layer.grad_matrix().clone() for i, layer in enumerate(strategy.layers)})

    strategy.after_backward = after_backward
    trainer.fit(strategy, [stream.tasks[1]], epochs=1)
    for i, basis in enumerate(strategy.bases):
        if basis is not None and basis.shape[1]:
            assert (captured[i] @ basis).abs().max() < 1e-4


def test_compile_gives_the_uncompiled_accuracy_matrix(run_tiny):
    overrides = ["stream=permuted_mnist5k", "stream.num_tasks=2", "stream.train_per_task=1000", "trainer.epochs=2"]
    plain = run_tiny(overrides)
    compiled = run_tiny([*overrides, "trainer.compile=default"])
    assert compiled["run_id"] != plain["run_id"]
    assert np.allclose(compiled["acc_matrix"], plain["acc_matrix"], atol=0.5)
    assert max(max(row) for row in plain["acc_matrix"]) > 50.0  # it trained, so equal matrices mean something


def test_cpu_threads_sets_torch_threads_and_rejects_zero(run_tiny):
    before = torch.get_num_threads()
    wanted = before + 1  # not the current count, so a setting that is ignored shows (conftest sets 1)
    try:
        run_tiny(["stream=split_digits", "stream.num_tasks=2", f"cpu_threads={wanted}"])
        assert torch.get_num_threads() == wanted
        with pytest.raises(ValueError, match="cpu_threads must be >= 1"):
            run_tiny(["stream=split_digits", "stream.num_tasks=2", "cpu_threads=0"])
    finally:
        torch.set_num_threads(before)


def test_prepare_compiles_every_model_the_strategy_evaluates(compose_cfg):
    from torch._dynamo.utils import counters

    strategy, stream, trainer = build(compose_cfg, PERMUTED, compile="default")
    names = [name for name, _ in strategy.model.named_parameters()]
    trainer.prepare(strategy)
    torch._dynamo.reset()  # an earlier test's compiled graph could otherwise be reused from the cache
    counters.clear()
    trainer.fit(strategy, [stream.tasks[0]], epochs=1)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured the model's forward
    assert [name for name, _ in strategy.model.named_parameters()] == names  # compiled in place


def test_a_plain_sgd_run_never_imports_dynamo(tmp_path):
    """Constructing a torch.optim optimizer imports torch._dynamo (~1 s of a short run's start-up); the
    trainer's own SGD must keep a default run free of it."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from hydra import compose, initialize_config_dir\n"
        "from clbench.__main__ import CONFIG_DIR\n"
        "from clbench.runner import run\n"
        "with initialize_config_dir(config_dir=CONFIG_DIR, version_base='1.3'):\n"
        "    cfg = compose(config_name='config', overrides=['stream=permuted_mnist5k', 'stream.num_tasks=2',\n"
        "        'stream.train_per_task=200', 'model=mlp', 'logger=none', 'verbose=false', 'trainer.progress=false',\n"
        f"        'trainer.epochs=1', 'results_dir={tmp_path}'])\n"
        "run(cfg)\n"
        "print('DYNAMO', any(name.startswith('torch._dynamo') for name in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "DYNAMO False" in done.stdout


@pytest.mark.parametrize("prefetch_mb", [0.0, 0.3, 16.0])
def test_prefetched_inputs_train_exactly_as_batch_by_batch(compose_cfg, prefetch_mb):
    """Blocks of prepared inputs (0.3 MB: 3 batches of 32 per block, 300 samples: a ragged last block) give
    the parameters that preparing every batch on its own gives, bit for bit."""
    reference, stream, trainer = build(compose_cfg, PERMUTED, prefetch_mb=0.0)
    trainer.fit(reference, [stream.tasks[1]])
    strategy, stream, trainer = build(compose_cfg, PERMUTED, prefetch_mb=prefetch_mb)
    assert trainer.prefetch_steps() == {0.0: 1, 0.3: 3, 16.0: 167}[prefetch_mb]
    trainer.fit(strategy, [stream.tasks[1]])
    for ours, theirs in zip(strategy.model.parameters(), reference.model.parameters(), strict=True):
        assert torch.equal(ours, theirs)


def test_negative_prefetch_is_rejected():
    with pytest.raises(ValueError, match="prefetch_mb must be >= 0"):
        Trainer(prefetch_mb=-1)


def count_input_calls(stream):
    """Wrap ``stream.inputs`` to count the samples it prepares."""
    original, seen = stream.inputs, []

    def counted(split, index, task_ids, **kwargs):
        seen.append(int(index.numel()))
        return original(split, index, task_ids, **kwargs)

    stream.inputs = counted
    return seen


@pytest.mark.parametrize("give_task_id", [False, True])
def test_evaluation_inputs_are_prepared_once_and_rows_stay_exact(compose_cfg, give_task_id):
    """The second and later rows of R reuse the first row's prepared inputs; the model changes between
    rows, so a cache of anything but inputs would show as an unchanged row."""
    cached, stream, trainer = build(compose_cfg, PERMUTED, eval_batch_size=256, eval_chunk_mb=0)
    plain, _, plain_trainer = build(compose_cfg, PERMUTED, eval_batch_size=256, eval_chunk_mb=0, eval_cache_mb=0)
    seen = count_input_calls(stream)
    rows, plain_rows = [], []
    for task in stream.tasks[:2]:
        trainer.fit(cached, [task])
        plain_trainer.fit(plain, [task])
        before = sum(seen)
        rows.append(trainer.evaluate(cached, give_task_id))
        plain_rows.append(plain_trainer.evaluate(plain, give_task_id))
        prepared = sum(seen) - before
        assert prepared == (3000 if task.id == 0 else 0)  # 3 test sets of 1,000, prepared once
    assert rows == plain_rows  # bit for bit
    assert rows[0] != rows[1]


def test_evaluation_cache_stays_within_its_budget(compose_cfg):
    strategy, stream, trainer = build(compose_cfg, PERMUTED, eval_batch_size=256, eval_chunk_mb=0, eval_cache_mb=1)
    plain, _, plain_trainer = build(compose_cfg, PERMUTED, eval_batch_size=256, eval_chunk_mb=0, eval_cache_mb=0)
    seen = count_input_calls(stream)
    for _ in range(2):
        row = trainer.evaluate(strategy, give_task_id=False)
    assert trainer.evaluator.kept_bytes <= 2**20
    # 1 MB holds 1 chunk of 256 x 784 fp32 (0.77 MB): the second row prepares the other 3000 - 256
    assert sum(seen) == 3000 + 3000 - 256
    assert row == plain_trainer.evaluate(plain, give_task_id=False)


def test_attach_empties_the_evaluation_cache(compose_cfg):
    strategy, stream, trainer = build(compose_cfg, PERMUTED)
    trainer.evaluate(strategy, give_task_id=False)
    assert trainer.evaluator.kept_bytes > 0
    trainer.attach(stream, 1)
    assert trainer.evaluator.kept_bytes == 0 and not trainer.evaluator.kept


class InfersPerBatch(Finetune):
    """Records the batches ``predict`` is handed, as a strategy that infers one task per batch would see them."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def inference_batch(self):
        return 70

    def predict(self, x, task_id):
        self.batches.append((x.shape[0], task_id))
        return super().predict(x, task_id)


def test_a_strategy_inferring_per_batch_gets_one_tasks_samples_in_its_own_batch_size(compose_cfg):
    strategy, stream, trainer = build(compose_cfg, PERMUTED, InfersPerBatch(), eval_batch_size=256, eval_chunk_mb=0)
    trainer.evaluator._batched_row = lambda *_: pytest.fail("chunks shared by all tasks would mix tasks")
    trainer.evaluate(strategy, give_task_id=False)
    per_task = [70] * 14 + [20]  # each 1,000-sample test set on its own, in batches of 70
    assert strategy.batches == [(size, None) for size in per_task * len(stream)]
    strategy.batches.clear()
    trainer.evaluate(strategy, give_task_id=True)  # a given task id needs no inference: the usual chunks
    assert strategy.batches == [(size, task.id) for task in stream.tasks for size in (256, 256, 256, 232)]


class ScaledInputs(Finetune):
    """A strategy whose prediction first scales its inputs in fp32, before any autocast-eligible op."""

    def predict(self, x, task_id):
        return super().predict(x * torch.tensor(1.001, dtype=torch.float32), task_id)


@pytest.mark.parametrize(("strategy_class", "kept_dtype"), [(Finetune, torch.bfloat16), (ScaledInputs, torch.float32)])
def test_bf16_evaluation_keeps_rounded_inputs_only_where_the_logits_are_unchanged(
    compose_cfg, strategy_class, kept_dtype
):
    """Under eval_amp the kept inputs are rounded to bf16 once when the model's first matmul would round
    them anyway; a model that works on them in fp32 first keeps fp32 inputs. Either way, every row equals
    the uncached row bit for bit."""
    kwargs = {"eval_batch_size": 256, "eval_chunk_mb": 0, "eval_amp": "bf16"}
    cached, stream, trainer = build(compose_cfg, PERMUTED, strategy_class(), **kwargs)
    plain, _, plain_trainer = build(compose_cfg, PERMUTED, strategy_class(), **kwargs, eval_cache_mb=0)
    for task in stream.tasks[:2]:
        trainer.fit(cached, [task])
        plain_trainer.fit(plain, [task])
        row = trainer.evaluate(cached, give_task_id=False)
        assert row == plain_trainer.evaluate(plain, give_task_id=False)
    assert {x.dtype for x in trainer.evaluator.kept.values()} == {kept_dtype}
    assert trainer.evaluator.kept_rounded is (kept_dtype == torch.bfloat16)
    trainer.attach(stream, 1)
    assert trainer.evaluator.kept_rounded is None  # a new run probes again


def count_casts(trainer, strategy) -> int:
    """dtype copies (``aten::_to_copy``) made while filling one row of R."""
    from torch.profiler import profile

    with profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.evaluate(strategy, give_task_id=False)
    return sum(event.count for event in prof.key_averages() if event.key == "aten::_to_copy")


def test_a_bf16_row_casts_each_weight_once_not_once_per_chunk(compose_cfg):
    """One autocast region spans the row, so its cast-weight cache serves every chunk: an MLP's six weights
    and biases are cast once per row whether the row is 3 chunks or 12."""
    few, _, few_trainer = build(compose_cfg, PERMUTED, eval_batch_size=1000, eval_chunk_mb=0, eval_amp="bf16")
    many, _, many_trainer = build(compose_cfg, PERMUTED, eval_batch_size=250, eval_chunk_mb=0, eval_amp="bf16")
    for strategy, trainer in ((few, few_trainer), (many, many_trainer)):
        trainer.evaluate(strategy, give_task_id=False)  # the first row prepares and keeps the inputs
    # 6 weight and bias casts and the row's hit count to float64; per chunk it would be 6 x 12 + 1
    assert count_casts(many_trainer, many) == count_casts(few_trainer, few) == 7


def test_evaluation_chunks_grow_to_their_byte_budget_for_small_inputs_only(compose_cfg):
    strategy, stream, trainer = build(compose_cfg, PERMUTED)  # 1 x 28 x 28: 3,136 bytes per fp32 sample
    assert trainer.eval_chunk_size() == 16 * 2**20 // 3136 == 5349
    trainer.eval_chunk_mb = 0
    assert trainer.eval_chunk_size() == trainer.eval_batch_size == 1000
    trainer.eval_chunk_mb, trainer.eval_batch_size = 1, 700  # 1 MB holds 334 samples: eval_batch_size wins
    assert trainer.eval_chunk_size() == 700
    trainer.eval_chunk_mb, trainer.eval_batch_size, trainer.eval_cache_mb = 16, 1000, 8
    assert trainer.eval_chunk_size() == 1000  # 3,000 test inputs (9.4 MB) are not all kept: prepared every row
    trainer.eval_cache_mb = 64
    seen = count_input_calls(stream)
    row = trainer.evaluate(strategy, give_task_id=False)
    assert seen == [1000] * 3  # one chunk of 3,000 samples, its inputs built test set by test set
    trainer.eval_chunk_mb = 0
    assert trainer.evaluate(strategy, give_task_id=False) == pytest.approx(row, abs=1e-9)
    with pytest.raises(ValueError, match="eval_chunk_mb must be >= 0"):
        Trainer(eval_chunk_mb=-1)


def test_negative_evaluation_cache_is_refused():
    with pytest.raises(ValueError, match="eval_cache_mb must be >= 0"):
        Trainer(eval_cache_mb=-1)
