"""Models: a backbone plus one head per task or one shared head (see :class:`ContinualModel`)."""

from clbench.models.alexnet import AlexNet
from clbench.models.bayesian import BayesConv2d, BayesLinear, GaussianPosterior, bayesianize
from clbench.models.heads import ContinualModel, MultiHead, reset_parameters
from clbench.models.mlp import MLP
from clbench.models.resnet import ResNet18
from clbench.models.vit import ViT

__all__ = [
    "MLP",
    "AlexNet",
    "BayesConv2d",
    "BayesLinear",
    "ContinualModel",
    "GaussianPosterior",
    "MultiHead",
    "ResNet18",
    "ViT",
    "bayesianize",
    "reset_parameters",
]
