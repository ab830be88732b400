"""Gradient-projection strategies with backward transfer: GPM, TRGP and CUBER.

GPM (Saha et al., ICLR 2021) projects gradients away from the input subspaces of old tasks; TRGP
(Lin et al., ICLR 2022) adds per-layer trust regions of correlated old tasks with learned scaled weight
projections; CUBER (Lin et al., NeurIPS 2022) also lets positively correlated old tasks' subspaces be
updated, for backward transfer. ``projection`` holds what they share.
"""

from strategies.gradient_projection.cuber import CUBER
from strategies.gradient_projection.gpm import GPM
from strategies.gradient_projection.trgp import TRGP

__all__ = ["CUBER", "GPM", "TRGP"]
