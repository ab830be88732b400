"""Nearest class mean (clbench/ncm.py): both definitions on a hand-checkable example where they disagree."""

from __future__ import annotations

import math

import pytest
import torch

from clbench.ncm import NearestClassMean

# class 0 lies far out along x, class 1 close to the origin along y
SUPPORT = torch.tensor([[8.0, 0.0], [12.0, 0.0], [1.0, 1.0], [-1.0, 1.0]])
LABELS = torch.tensor([0, 0, 1, 1])
QUERY = torch.tensor([[2.0, 1.0]])


def test_euclidean_means_are_plain_means_and_the_nearest_wins():
    # means (10, 0) and (0, 1); the query (2, 1) is sqrt(65) from the first and 2 from the second: class 1
    ncm = NearestClassMean.fit(SUPPORT, LABELS, 2, "euclidean")
    assert torch.allclose(ncm.means, torch.tensor([[10.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(ncm.scores(QUERY), torch.tensor([[-math.sqrt(65.0), -2.0]]))
    assert ncm.predict(QUERY).tolist() == [1]


def test_cosine_means_are_normalised_means_of_normalised_features_and_the_closest_direction_wins():
    # iCaRL: normalised features (1, 0), (1, 0) and (+-0.71, 0.71) have means (1, 0) and (0, 0.71), normalised
    # (1, 0) and (0, 1); the query's direction (2, 1) / sqrt(5) has cosines 2 / sqrt(5) and 1 / sqrt(5): class 0
    ncm = NearestClassMean.fit(SUPPORT, LABELS, 2, "cosine")
    assert torch.allclose(ncm.means, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(ncm.scores(QUERY), torch.tensor([[2.0, 1.0]]) / math.sqrt(5.0))
    assert ncm.predict(QUERY).tolist() == [0]
    # only directions count: scaling a query or the support changes nothing
    assert torch.allclose(NearestClassMean.fit(3 * SUPPORT, LABELS, 2, "cosine").scores(7 * QUERY), ncm.scores(QUERY))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_classes_without_support_are_never_predicted_and_ties_go_to_the_lowest_class(metric):
    ncm = NearestClassMean.fit(SUPPORT, torch.tensor([0, 0, 2, 2]), 3, metric)
    assert ncm.present.tolist() == [True, False, True]
    scores = ncm.scores(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    assert torch.isinf(scores[:, 1]).all() and (scores[:, 1] < 0).all()
    assert ncm.predict(torch.tensor([[0.0, 1.0]])).tolist() == [2]
    # equidistant from both means (cosine: a zero vector has no direction): the lower class
    tie = torch.tensor([[0.0, 0.0]]) if metric == "cosine" else torch.tensor([[5.0, 0.5]])
    assert ncm.predict(tie).tolist() == [0]


def test_scores_are_fp32_under_bf16_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ncm = NearestClassMean.fit(SUPPORT.bfloat16(), LABELS, 2, "cosine")
        scores = ncm.scores(QUERY.bfloat16())
    assert ncm.means.dtype == scores.dtype == torch.float32


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="unknown NCM metric"):
        NearestClassMean.fit(SUPPORT, LABELS, 2, "manhattan")  # type: ignore[arg-type]
