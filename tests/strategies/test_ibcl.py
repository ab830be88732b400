"""IBCL: the preference's model is the w-weighted combination of the extreme points (one-hot on task j: task
j's points alone), the weights form a distribution, the zero-shot path never optimizes, training does not
depend on the preferences, and a run writes one accuracy matrix per preference plus the Pareto front."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clbench.data import load_synthetic
from clbench.models import MLP
from clbench.models.bayesian import bayesian_layers, posterior_of
from clbench.report import main as report_main
from clbench.streams import split_stream
from clbench.trainer import Trainer
from strategies.ibcl import (
    IBCL,
    combine,
    extreme_point_weights,
    hdr_sample,
    non_dominated,
    restrict_preference,
)

NUM_TASKS = 3


def _setup(scenario: str = "task", **settings):
    torch.manual_seed(0)
    data = load_synthetic(num_classes=2 * NUM_TASKS, shape=(1, 6, 6), train_per_class=24, test_per_class=8)
    stream = split_stream(data, NUM_TASKS, 2, scenario=scenario)
    strategy = IBCL(**{"num_extreme_points": 2, "prior_sigma": [0.1, 0.3], "sample": 4, **settings})
    strategy.setup(MLP(stream.input_shape, stream.head_sizes, hidden=[12]), stream)
    trainer = Trainer(epochs=1, batch_size=16, lr=0.01, optimizer="adam", progress=False)
    trainer.attach(stream, 0)
    return strategy, stream, trainer


def _train(strategy, stream, trainer, tasks: int = NUM_TASKS) -> None:
    for task in stream.tasks[:tasks]:
        strategy.fit_task(task, trainer)
        strategy.after_task(task)


@pytest.fixture(scope="module")
def trained():
    strategy, stream, trainer = _setup()
    _train(strategy, stream, trainer)
    return strategy, stream, trainer


def _assert_same(posterior, expected, keys) -> None:
    for key in keys:
        torch.testing.assert_close(posterior.mu[key], expected.mu[key], rtol=0, atol=1e-7)
        torch.testing.assert_close(posterior.sigma[key], expected.sigma[key], rtol=0, atol=1e-7)


def _points_of(strategy, task_id: int):
    return [strategy.knowledge_base[k] for k in strategy.extreme_points[task_id]]


@pytest.mark.parametrize("task_heads", ["own", "combine"])
def test_one_hot_preference_is_the_combination_of_that_tasks_extreme_points(task_heads):
    strategy, stream, trainer = _setup(task_heads=task_heads)
    _train(strategy, stream, trainer)
    m = strategy.num_extreme_points
    heads = {key for t in range(NUM_TASKS) for key in strategy.head_keys(t)}
    for j in range(NUM_TASKS):
        one_hot = np.eye(NUM_TASKS)[j]
        posterior = strategy.zero_shot_posterior(one_hot)
        own = combine(_points_of(strategy, j), [1.0 / m] * m)
        # the shared body and task j's head always; every head too when the preference combines heads
        keys = set(own.mu) - heads | set(strategy.head_keys(j)) if task_heads == "own" else set(own.mu)
        _assert_same(posterior, own, keys)
        if task_heads == "own":
            for k in range(NUM_TASKS):
                _assert_same(posterior, combine(_points_of(strategy, k), [1.0 / m] * m), strategy.head_keys(k))
        # and it is not what another task's points give (the test can fail)
        other = combine(_points_of(strategy, (j + 1) % NUM_TASKS), [1.0 / m] * m)
        assert not torch.allclose(posterior.mu["body.1.weight"], other.mu["body.1.weight"])


def test_one_hot_with_zero_hdr_mass_loads_the_combined_mean_into_the_model(trained):
    strategy = trained[0]
    mass = strategy.hdr_mass
    strategy.hdr_mass = 0.0
    try:
        values = strategy.load_zero_shot(np.eye(NUM_TASKS)[1], seed=5)
    finally:
        strategy.hdr_mass = mass
    expected = strategy.zero_shot_posterior(np.eye(NUM_TASKS)[1])
    for key, param in strategy.point_model.named_parameters():
        assert torch.equal(param, values[key]) and torch.equal(param, expected.mu[key])


def test_one_hot_rows_keep_only_that_tasks_points_in_the_domain_scenario():
    strategy, stream, trainer = _setup(scenario="domain", sample=0, preferences=[[0, 1, 0]])
    _train(strategy, stream, trainer)
    m = strategy.num_extreme_points
    own = combine(_points_of(strategy, 1), [1.0 / m] * m)
    _assert_same(strategy.zero_shot_posterior([0.0, 1.0, 0.0]), own, own.mu.keys())
    # after task 0 the preference (0, 1, 0) is cut to (0) -> all zero -> uniform over the one seen task
    assert restrict_preference([0, 1, 0], 1).tolist() == [1.0]
    rows = np.asarray(strategy.rows[0])
    assert rows.shape == (NUM_TASKS, NUM_TASKS)


def test_combination_weights_are_a_distribution_for_given_and_sampled_preferences(trained):
    strategy = trained[0]
    given = IBCL(preferences=[[2, 0, 1], [0, 0, 5]], sample=7).resolve_preferences(NUM_TASKS)
    assert given.shape == (9, NUM_TASKS)
    for preferences in (given, strategy.preferences):
        for preference in preferences:
            assert (preference >= 0).all() and preference.sum() == pytest.approx(1.0)
            for seen in range(1, NUM_TASKS + 1):
                weights = extreme_point_weights(restrict_preference(preference, seen), 2)
                assert weights.shape == (seen, 2)
                assert (weights >= 0).all() and weights.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(given[0], [2 / 3, 0, 1 / 3])
    # the first k of N draws are the k draws: a preference's model does not depend on how many are asked
    np.testing.assert_array_equal(IBCL(sample=3).resolve_preferences(4), IBCL(sample=9).resolve_preferences(4)[:3])
    with pytest.raises(ValueError, match="sum to 1"):
        extreme_point_weights([0.5, 0.6], 2)
    with pytest.raises(ValueError, match="non-negative"):
        combine(_points_of(strategy, 0), [1.5, -0.5])


def test_zero_shot_path_never_creates_or_steps_an_optimizer(monkeypatch):
    strategy, stream, trainer = _setup()
    strategy.fit_task(stream[0], trainer)
    before = {k: v.detach().clone() for k, v in strategy.model.state_dict().items()}

    def forbidden(*args, **kwargs):
        raise AssertionError("the zero-shot path must not optimize")

    monkeypatch.setattr(trainer, "make_optimizer", forbidden)
    monkeypatch.setattr(trainer, "fit", forbidden)
    monkeypatch.setattr(torch.optim.Optimizer, "__init__", forbidden)
    for optimizer in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        monkeypatch.setattr(optimizer, "step", forbidden)
    strategy.after_task(stream[0])
    assert all(len(rows) == 1 for rows in strategy.rows)
    after = strategy.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in strategy.point_model.parameters())
    # the guard works: training does hit it
    with pytest.raises(AssertionError, match="must not optimize"):
        strategy.fit_task(stream[1], trainer)


def test_training_does_not_depend_on_the_preferences():
    few, stream, trainer = _setup(sample=1)
    _train(few, stream, trainer, tasks=2)
    many, stream, trainer = _setup(sample=20)  # _setup re-seeds the global generator the same way
    _train(many, stream, trainer, tasks=2)
    assert len(few.knowledge_base) == len(many.knowledge_base) == 4
    for a, b in zip(few.knowledge_base, many.knowledge_base, strict=True):
        _assert_same(a, b, a.mu.keys())
    assert len(many.timings.train_s) == 2 and len(many.rows) == 20
    # the first preference's model is the same whether 1 or 20 preferences are evaluated
    assert few.rows[0] == many.rows[0]


def test_hdr_sample_stays_in_the_central_box_and_is_seeded(trained):
    strategy = trained[0]
    posterior = strategy.zero_shot_posterior([0.2, 0.3, 0.5])
    draw = lambda seed: hdr_sample(posterior, 0.5, torch.Generator().manual_seed(seed))  # noqa: E731
    first, again, other = draw(1), draw(1), draw(2)
    z = 0.6744897501960817  # Phi^-1(0.75): the central 50 % interval
    for key, mu in posterior.mu.items():
        assert ((first[key] - mu).abs() <= z * posterior.sigma[key] + 1e-6).all()
        assert torch.equal(first[key], again[key])
    assert not torch.equal(first["body.1.weight"], other["body.1.weight"])
    mean = hdr_sample(posterior, 0.0, torch.Generator().manual_seed(1))
    assert all(torch.equal(mean[k], posterior.mu[k]) for k in posterior.mu)


def test_buffer_reuses_a_close_extreme_point():
    strategy, stream, trainer = _setup(buffer_distance=1.0)  # every new point is within 1.0 of the first
    _train(strategy, stream, trainer, tasks=2)
    assert len(strategy.knowledge_base) == 1
    assert strategy.extreme_points == [[0, 0], [0, 0]] and len(strategy.reused) == 3


def test_non_dominated_marks_the_pareto_front():
    points = np.array([[90, 50], [50, 90], [60, 60], [55, 55], [90, 50]])
    assert non_dominated(points) == [True, True, True, False, True]


def test_state_dict_resumes_the_knowledge_base_and_rows(trained):
    strategy = trained[0]
    state = strategy.state_dict()
    fresh, _, _ = _setup()
    fresh.load_state_dict(state)
    assert fresh.rows == strategy.rows and fresh.extreme_points == strategy.extreme_points
    _assert_same(
        fresh.zero_shot_posterior([0.1, 0.1, 0.8]), strategy.zero_shot_posterior([0.1, 0.1, 0.8]), ["body.1.weight"]
    )
    with pytest.raises(ValueError, match="resume=false"):
        _setup(sample=2)[0].load_state_dict(state)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"preferences": [[1, 0]]}, "has 2 entries but the stream has 3 tasks"),
        ({"preferences": [[1, -1, 0]]}, "negative"),
        ({"preferences": [[0, 0, 0]]}, "all zero"),
        ({"preferences": [], "sample": 0}, "no preferences"),
    ],
)
def test_bad_preferences_stop_with_the_fix(settings, message):
    with pytest.raises(ValueError, match=message):
        IBCL(**settings).resolve_preferences(NUM_TASKS)


def test_bad_settings_stop_with_the_fix():
    with pytest.raises(ValueError, match="give one per extreme point"):
        IBCL(num_extreme_points=3, prior_sigma=[0.1, 0.2])
    with pytest.raises(ValueError, match="hdr_mass"):
        IBCL(hdr_mass=1.0)
    with pytest.raises(ValueError, match="task_heads"):
        IBCL(task_heads="mix")
    assert len(IBCL().resolve_preferences(NUM_TASKS)) == 10  # neither given: 10 draws


def test_cli_run_writes_a_matrix_per_preference_and_the_report_plots_the_front(run_tiny, tmp_path):
    result = run_tiny(
        [
            "strategy=ibcl",
            "stream=split_digits",
            "trainer.optimizer=adam",
            "trainer.lr=0.01",
            "strategy.num_extreme_points=2",
            "strategy.prior_sigma=0.2",
            "strategy.sample=3",
            "strategy.preferences=[[1,0,0,0,0],[0,0,0,0,1]]",
        ],
        tmp_path / "results",
    )
    assert result["status"] == "completed"
    written = json.loads(Path(result["paths"]["result"]).read_text())
    ibcl = written["ibcl"]
    assert len(ibcl["preferences"]) == len(ibcl["acc_matrices"]) == len(ibcl["metrics"]) == 5
    assert all(np.asarray(m).shape == (5, 5) for m in ibcl["acc_matrices"])
    assert {"acc", "bwt"} <= set(ibcl["metrics"][0])
    front = ibcl["pareto_front"]
    assert len(front["final_acc"]) == 5 and len(front["non_dominated"]) == 5 and any(front["non_dominated"])
    assert front["final_acc"][0] == ibcl["acc_matrices"][0][-1]
    assert len(ibcl["timings"]["train_s"]) == len(ibcl["timings"]["zero_shot_s"]) == 5
    assert report_main([str(tmp_path / "results"), "--plots", str(tmp_path / "plots")]) == 0
    pareto = list((tmp_path / "plots").glob("ibcl_pareto_split_digits_*.png"))
    assert len(pareto) == 1 and pareto[0].stat().st_size > 10_000


def test_official_mode_divides_the_kl_by_the_batch_size_and_clbench_by_the_training_set_size():
    for mode, divisor in (("clbench", lambda batch, n: n), ("official", lambda batch, n: batch)):
        strategy, stream, _ = _setup(mode=mode)
        task = stream[0]
        strategy._kl_layers = [layer for _, layer in bayesian_layers(strategy.model)]
        strategy._num_train = task.num_train
        x = stream.inputs("train", task.train_index[:5], 0)
        y = task.train_targets[:5]
        output = strategy.model(x, 0)
        kl = torch.stack([layer.kl() for layer in strategy._kl_layers]).sum()
        expected = F.cross_entropy(output, y) + kl / divisor(5, task.num_train)
        torch.testing.assert_close(strategy.loss(output, y, None, task), expected)


def test_official_mode_starts_every_fit_at_mean_zero_and_sigma_one(monkeypatch):
    strategy, stream, trainer = _setup(mode="official")
    starts = []
    fit = Trainer.fit

    def recording_fit(self, strat, tasks, *args, **kwargs):
        starts.append(posterior_of(strat.model))
        return fit(self, strat, tasks, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", recording_fit)
    _train(strategy, stream, trainer, tasks=2)
    assert len(starts) == 2 * strategy.num_extreme_points
    for k, start in enumerate(starts):
        task_id = k // strategy.num_extreme_points
        trained = ["body.1.weight", "body.1.bias", *strategy.head_keys(task_id)]
        for key in trained:
            assert torch.equal(start.mu[key], torch.zeros_like(start.mu[key])), key
            torch.testing.assert_close(start.sigma[key], torch.ones_like(start.sigma[key]))
    # clbench's mode warm-starts task 1 from each chain's task-0 posterior instead
    warm, stream, trainer = _setup()
    starts.clear()
    _train(warm, stream, trainer, tasks=2)
    assert not torch.equal(starts[2].mu["body.1.weight"], torch.zeros_like(starts[2].mu["body.1.weight"]))
    _assert_same(starts[2], warm.knowledge_base[warm.extreme_points[0][0]], ["body.1.weight"])


def test_official_hdr_draw_moves_a_whole_tensor_by_one_scalar(trained):
    posterior = trained[0].zero_shot_posterior([0.2, 0.3, 0.5])
    official = hdr_sample(posterior, 0.5, torch.Generator().manual_seed(1), per_tensor=True)
    entry = hdr_sample(posterior, 0.5, torch.Generator().manual_seed(1))
    for key, mu in posterior.mu.items():
        sigma = posterior.sigma[key]
        positions = ((official[key] - mu) / sigma)[sigma > 0]
        torch.testing.assert_close(positions, positions[:1].expand_as(positions), rtol=0, atol=1e-4)
    per_entry = ((entry["body.1.weight"] - posterior.mu["body.1.weight"]) / posterior.sigma["body.1.weight"]).flatten()
    assert per_entry.std() > 0.1  # the default draw is one uniform per entry


def test_official_mode_records_ten_draws_per_preference_and_their_mean_as_the_row():
    strategy, stream, trainer = _setup(mode="official", sample=2)
    _train(strategy, stream, trainer, tasks=2)
    results = strategy.extra_results()["ibcl"]
    assert results["mode"] == "official" and results["hdr_draws"] == 10
    draws = np.asarray(results["draw_rows"])  # [preference, task, draw, evaluated task]
    assert draws.shape == (2, 2, 10, NUM_TASKS)
    np.testing.assert_allclose(np.asarray(strategy.rows), draws.mean(axis=2), rtol=1e-6)
    assert (draws.std(axis=2) > 0).any()  # the draws differ
    assert strategy.extra_results()["ibcl"]["mode"] == "official"
    default, stream, trainer = _setup(sample=2)
    _train(default, stream, trainer, tasks=1)
    assert default.extra_results()["ibcl"]["mode"] == "clbench" and default.extra_results()["ibcl"]["draw_rows"] == []
    with pytest.raises(ValueError, match=r"strategy\.mode"):
        IBCL(mode="pyro")


def test_a_stream_without_square_r_is_an_unsupported_pair(run_tiny):
    """IBCL on a SCoLe stream cannot run by design: a comparison sweep must record it as skipped, not failed (the
    scole_mnist5k glob sweep counted it as a failure and exited 1)."""
    from clbench.__main__ import _is_skip

    with pytest.raises(ValueError, match="square R") as raised:
        run_tiny(["protocol=scole_mnist5k", "strategy=ibcl", "stream.num_tasks=4", "stream.samples_per_class=20"])
    assert _is_skip(raised.value)
