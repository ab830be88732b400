"""Nearest-class-mean (NCM) classification of feature vectors, shared by the control set and selective init.

A class's mean is the mean feature vector of its labelled samples (the *support*); a query goes to the class whose
mean is nearest. Two definitions of "nearest" are in use, and each user picks the one its design asks for:

* ``cosine`` (Rebuffi et al., iCaRL, CVPR 2017, the classifier the control set's ``readout=ncm`` follows): every
  feature vector is L2-normalised, the mean of a class's normalised vectors is normalised again, and the query goes
  to the mean of largest cosine similarity, which on the unit sphere is the nearest mean in Euclidean distance. Only
  the direction of a feature vector counts, so a stream that rescales features (a larger norm after fine-tuning)
  does not change the readout by that alone: what a control set measures is what the features encode.
* ``euclidean``: raw (unnormalised) features and plain class means, nearest in Euclidean distance. This is a linear
  classifier over the features, ``argmax_c  mu_c . f - |mu_c|^2 / 2``, the same family as the linear head it stands
  in for where that head is untrained (selective init's scorer), reading the features' magnitude as a head would.

Classes without a support sample cannot be predicted (their score is -inf). Scores and means are computed in fp32
with autocast off: the features may come from a bf16 forward pass, but the readout's own arithmetic is not rounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Metric = Literal["cosine", "euclidean"]
METRICS: tuple[Metric, ...] = ("cosine", "euclidean")


@dataclass(frozen=True)
class NearestClassMean:
    """Class means of a support set (``fit``) and the scores of queries against them (``scores``: the larger,
    the nearer; ``argmax`` over classes is the NCM prediction, ties to the lowest class)."""

    means: Tensor  # [num_classes, D] fp32; rows of absent classes are zero
    present: Tensor  # [num_classes] bool: the classes with at least one support sample
    metric: Metric

    @classmethod
    def fit(cls, features: Tensor, labels: Tensor, num_classes: int, metric: Metric) -> NearestClassMean:
        """The class means of ``features`` ``[N, D]`` with ``labels`` ``[N]`` in ``0..num_classes-1``."""
        if metric not in METRICS:
            raise ValueError(f"unknown NCM metric {metric!r}: use one of {', '.join(METRICS)}")
        with _no_autocast(features):
            features = features.flatten(1).float()
            if metric == "cosine":
                features = F.normalize(features, dim=1)
            sums = features.new_zeros(num_classes, features.shape[1]).index_add_(0, labels, features)
            counts = torch.bincount(labels, minlength=num_classes)[:num_classes]
            means = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)
            if metric == "cosine":
                means = F.normalize(means, dim=1)
        return cls(means, counts > 0, metric)

    def scores(self, features: Tensor) -> Tensor:
        """``[N, num_classes]`` fp32 scores of queries ``features`` ``[N, D]``: cosine similarity to each class
        mean (``cosine``) or minus the Euclidean distance (``euclidean``); -inf for classes absent from the
        support."""
        with _no_autocast(features):
            features = features.flatten(1).float()
            if self.metric == "cosine":
                scores = F.normalize(features, dim=1) @ self.means.T
            else:
                scores = -torch.cdist(features, self.means)
            return scores.masked_fill(~self.present, float("-inf"))

    def predict(self, features: Tensor) -> Tensor:
        """The nearest class of each query (``[N]`` labels)."""
        return self.scores(features).argmax(dim=1)


def _no_autocast(x: Tensor) -> torch.autocast:
    return torch.autocast(x.device.type, enabled=False)
