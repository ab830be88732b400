"""Group masking of a shared head's absent classes during training (Lesort et al., SCoLe).

Where a stream asks for it (``Stream.mask_absent_classes``, SCoLe's streams), the logits of the classes that
the fitted tasks do not contain are pushed to the dtype's minimum before the loss, so training on a task
never pushes down classes that are merely absent from it (they re-occur later in a SCoLe stream). Both
step kinds apply the same mask: the autograd step with ``masked_fill`` and the closed-form step inside
:class:`~clbench.closed_form.ClosedFormStep`. Everything stays on the device: no host read per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from clbench.streams import Stream, Task


def absent_classes(stream: Stream, tasks: Sequence[Task]) -> Tensor | None:
    """A ``[outputs]`` bool mask of the shared head's classes that ``tasks`` do not contain, built once per
    fit; None where the stream does not mask."""
    if not stream.mask_absent_classes:
        return None
    absent = torch.ones(stream.head_sizes[0], dtype=torch.bool, device=stream.device)
    for task in tasks:
        absent[list(task.classes)] = False
    return absent


def batch_absent(stream: Stream | None, absent: Tensor | None, y: Tensor) -> Tensor | None:
    """One step's mask: the fit's (``absent``) or, where the stream masks per batch (``masking: batch``,
    SCoLe's official code), the classes with no sample in this batch's targets ``y``."""
    if absent is None or stream is None or not stream.mask_per_batch:
        return absent
    return torch.ones_like(absent).index_fill_(0, y, False)


def mask_absent(logits: Tensor, absent: Tensor | None) -> Tensor:
    """``logits`` with the ``absent`` classes (a mask from :func:`batch_absent`) pushed to the dtype's minimum, out
    of place: they take no softmax mass and pass no gradient. Unchanged where there is no mask."""
    return logits if absent is None else logits.masked_fill(absent, torch.finfo(logits.dtype).min)
