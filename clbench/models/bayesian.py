"""Mean-field Gaussian variational layers, and the conversion of any clbench model into a Bayesian one.

Bayes-by-backprop (Blundell et al. 2015): every weight and bias entry has its own Gaussian
q(w) = N(mu, sigma^2) with sigma = softplus(rho), so sigma stays positive under unconstrained gradient
steps. In training mode a layer draws one weight sample per forward pass by reparameterisation
(w = mu + sigma * eps, eps ~ N(0, 1)), which makes the expected log-likelihood of the ELBO
differentiable in mu and rho; in eval mode it uses the mean. Each layer holds its prior
N(prior_mu, prior_sigma^2) as buffers, so a continual learner can make the last task's posterior the next
task's prior (variational continual learning) and the KL term is closed form.

:func:`bayesianize` swaps every ``nn.Linear`` / ``nn.Conv2d`` of a model (MLP, AlexNet, ResNet-18 and the
heads) for its Bayesian counterpart in place, with the deterministic weights as the initial means, so the
model keeps its class, ``features`` / ``heads`` and parameter layout. Other parameters (batch-norm affine
weights) stay deterministic: :class:`GaussianPosterior` gives them sigma 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SOFTPLUS_LINEAR_ABOVE = 20.0
"""Above this sigma, softplus(rho) == rho to float precision, so the inverse is the identity there."""


def softplus_inverse(sigma: Tensor) -> Tensor:
    """rho with softplus(rho) = sigma (sigma > 0); exact where expm1 would overflow."""
    sigma = sigma.clamp_min(torch.finfo(sigma.dtype).tiny)
    return torch.where(sigma > SOFTPLUS_LINEAR_ABOVE, sigma, torch.log(torch.expm1(sigma)))


def gaussian_kl(mu: Tensor, sigma: Tensor, prior_mu: Tensor, prior_sigma: Tensor) -> Tensor:
    """Sum over entries of KL(N(mu, sigma^2) || N(prior_mu, prior_sigma^2)), closed form."""
    ratio = (sigma / prior_sigma).pow(2)
    return 0.5 * (ratio + ((mu - prior_mu) / prior_sigma).pow(2) - 1.0 - torch.log(ratio)).sum()


class BayesianLayer(nn.Module):
    """What :class:`BayesLinear` and :class:`BayesConv2d` share: for each tensor ``name`` in
    ``tensor_names`` (``weight`` and, when present, ``bias``) the parameters ``<name>_mu`` and
    ``<name>_rho`` and the buffers ``<name>_prior_mu`` and ``<name>_prior_sigma``."""

    tensor_names: tuple[str, ...]

    def _init_gaussians(self, tensors: dict[str, Tensor], init_sigma: float, prior_sigma: float) -> None:
        if not init_sigma > 0 or not prior_sigma > 0:
            raise ValueError(f"init_sigma and prior_sigma must be > 0, got {init_sigma}, {prior_sigma}")
        self.tensor_names = tuple(tensors)
        for name, value in tensors.items():
            value = value.detach()
            self.register_parameter(f"{name}_mu", nn.Parameter(value.clone()))
            self.register_parameter(f"{name}_rho", nn.Parameter(softplus_inverse(torch.full_like(value, init_sigma))))
            self.register_buffer(f"{name}_prior_mu", torch.zeros_like(value))
            self.register_buffer(f"{name}_prior_sigma", torch.full_like(value, prior_sigma))

    def mu(self, name: str) -> Tensor:
        return getattr(self, f"{name}_mu")

    def sigma(self, name: str) -> Tensor:
        return F.softplus(getattr(self, f"{name}_rho"))

    def tensor(self, name: str) -> Tensor | None:
        """The tensor a forward pass uses: a reparameterised sample in training mode, the mean in eval mode."""
        if name not in self.tensor_names:
            return None
        mu = self.mu(name)
        if not self.training:
            return mu
        return mu + self.sigma(name) * torch.randn_like(mu)

    def kl(self) -> Tensor:
        """KL(q || prior) summed over this layer's tensors."""
        terms = [
            gaussian_kl(self.mu(n), self.sigma(n), getattr(self, f"{n}_prior_mu"), getattr(self, f"{n}_prior_sigma"))
            for n in self.tensor_names
        ]
        return torch.stack(terms).sum()


class BayesLinear(BayesianLayer):
    """``nn.Linear`` with a mean-field Gaussian over its weight and bias; built from a deterministic layer,
    whose weights become the means."""

    def __init__(self, layer: nn.Linear, init_sigma: float = 1e-3, prior_sigma: float = 1.0) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self._init_gaussians(_tensors_of(layer), init_sigma, prior_sigma)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.tensor("weight"), self.tensor("bias"))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={'bias' in self.tensor_names}"


class BayesConv2d(BayesianLayer):
    """``nn.Conv2d`` (zero padding) with a mean-field Gaussian over its kernel and bias; built from a
    deterministic layer, whose weights become the means."""

    def __init__(self, layer: nn.Conv2d, init_sigma: float = 1e-3, prior_sigma: float = 1.0) -> None:
        super().__init__()
        if layer.padding_mode != "zeros":
            raise ValueError(f"BayesConv2d supports padding_mode='zeros' only, got {layer.padding_mode!r}")
        for attribute in ("stride", "padding", "dilation", "groups", "in_channels", "out_channels", "kernel_size"):
            setattr(self, attribute, getattr(layer, attribute))
        self._init_gaussians(_tensors_of(layer), init_sigma, prior_sigma)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(
            x, self.tensor("weight"), self.tensor("bias"), self.stride, self.padding, self.dilation, self.groups
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, bias={'bias' in self.tensor_names}"
        )


def _tensors_of(layer: nn.Linear | nn.Conv2d) -> dict[str, Tensor]:
    tensors = {"weight": layer.weight}
    if layer.bias is not None:
        tensors["bias"] = layer.bias
    return tensors


def bayesianize(model: nn.Module, init_sigma: float = 1e-3, prior_sigma: float = 1.0) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` by a Bayesian layer whose means are
    the current weights and whose sigma is ``init_sigma``, with prior N(0, prior_sigma^2); returns ``model``.

    The module tree keeps its names, so ``body.1.weight`` of the deterministic model is ``body.1.weight_mu``
    / ``body.1.weight_rho`` here, and :func:`posterior_of` maps them back.
    """
    swapped = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, child_name, BayesLinear(child, init_sigma, prior_sigma))
            elif isinstance(child, nn.Conv2d):
                setattr(parent, child_name, BayesConv2d(child, init_sigma, prior_sigma))
            else:
                continue
            swapped += 1
    if swapped == 0:
        raise ValueError(f"bayesianize found no nn.Linear or nn.Conv2d in {type(model).__name__}")
    return model


def bayesian_layers(module: nn.Module) -> Iterator[tuple[str, BayesianLayer]]:
    """(path, layer) of every Bayesian layer under ``module``."""
    for path, layer in module.named_modules():
        if isinstance(layer, BayesianLayer):
            yield path, layer


def kl_divergence(module: nn.Module) -> Tensor:
    """KL(q || prior) summed over every Bayesian layer under ``module`` (0 when there is none)."""
    terms = [layer.kl() for _, layer in bayesian_layers(module)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def _key(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _deterministic_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameters that no Bayesian layer owns (batch-norm affine weights), by their model-level name."""
    for path, module in model.named_modules():
        if isinstance(module, BayesianLayer):
            continue
        for name, param in module.named_parameters(recurse=False):
            yield _key(path, name), param


@dataclass
class GaussianPosterior:
    """A mean-field Gaussian over every parameter of a model, keyed by the deterministic model's parameter
    names (``body.1.weight``), so a point drawn from it loads straight into the non-Bayesian model.
    Deterministic parameters carry sigma 0 (a point mass)."""

    mu: dict[str, Tensor]
    sigma: dict[str, Tensor]

    def __post_init__(self) -> None:
        if self.mu.keys() != self.sigma.keys():
            raise ValueError("GaussianPosterior needs a sigma for every mu")

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.mu.values())

    def to(self, device: torch.device | str) -> GaussianPosterior:
        return GaussianPosterior(
            {k: v.to(device) for k, v in self.mu.items()}, {k: v.to(device) for k, v in self.sigma.items()}
        )

    def state(self) -> dict[str, dict[str, Tensor]]:
        return {"mu": dict(self.mu), "sigma": dict(self.sigma)}

    @classmethod
    def from_state(cls, state: dict[str, dict[str, Tensor]]) -> GaussianPosterior:
        return cls(dict(state["mu"]), dict(state["sigma"]))

    def distance(self, other: GaussianPosterior) -> float:
        """||mu - mu'||_2 / n + ||sigma - sigma'||_2 / n over all n entries: the official IBCL code's
        distance for its buffer (reuse an old extreme point when a new one is this close)."""
        mu = torch.cat([(self.mu[k] - other.mu[k]).flatten() for k in self.mu])
        sigma = torch.cat([(self.sigma[k] - other.sigma[k]).flatten() for k in self.sigma])
        return float((mu.norm() + sigma.norm()) / max(1, mu.numel()))


def posterior_of(model: nn.Module) -> GaussianPosterior:
    """The variational posterior q held by ``model`` right now (detached copies)."""
    mu: dict[str, Tensor] = {}
    sigma: dict[str, Tensor] = {}
    for path, layer in bayesian_layers(model):
        for name in layer.tensor_names:
            mu[_key(path, name)] = layer.mu(name).detach().clone()
            sigma[_key(path, name)] = layer.sigma(name).detach().clone()
    for key, param in _deterministic_parameters(model):
        mu[key], sigma[key] = param.detach().clone(), torch.zeros_like(param.detach())
    return GaussianPosterior(mu, sigma)


def prior_of(model: nn.Module) -> GaussianPosterior:
    """The prior each Bayesian layer holds; deterministic parameters enter at their current value."""
    mu: dict[str, Tensor] = {}
    sigma: dict[str, Tensor] = {}
    for path, layer in bayesian_layers(model):
        for name in layer.tensor_names:
            mu[_key(path, name)] = getattr(layer, f"{name}_prior_mu").clone()
            sigma[_key(path, name)] = getattr(layer, f"{name}_prior_sigma").clone()
    for key, param in _deterministic_parameters(model):
        mu[key], sigma[key] = param.detach().clone(), torch.zeros_like(param.detach())
    return GaussianPosterior(mu, sigma)


@torch.no_grad()
def load_posterior(model: nn.Module, posterior: GaussianPosterior, keys: set[str] | None = None) -> None:
    """Set q (mu, rho) of ``model`` to ``posterior`` (only ``keys`` when given); deterministic parameters
    take the mean."""
    for path, layer in bayesian_layers(model):
        for name in layer.tensor_names:
            key = _key(path, name)
            if keys is None or key in keys:
                layer.mu(name).copy_(posterior.mu[key])
                getattr(layer, f"{name}_rho").copy_(softplus_inverse(posterior.sigma[key]))
    for key, param in _deterministic_parameters(model):
        if keys is None or key in keys:
            param.copy_(posterior.mu[key])


@torch.no_grad()
def set_prior(model: nn.Module, prior: GaussianPosterior) -> None:
    """Make ``prior`` the prior of every Bayesian layer of ``model`` (e.g. the last task's posterior)."""
    for path, layer in bayesian_layers(model):
        for name in layer.tensor_names:
            key = _key(path, name)
            getattr(layer, f"{name}_prior_mu").copy_(prior.mu[key])
            getattr(layer, f"{name}_prior_sigma").copy_(prior.sigma[key])


def isotropic_prior(model: nn.Module, sigma: float) -> GaussianPosterior:
    """N(0, sigma^2) over every Bayesian tensor of ``model`` (the first task's prior); deterministic
    parameters at their current value."""
    if not sigma > 0:
        raise ValueError(f"a prior sigma must be > 0, got {sigma}")
    bayesian = _bayesian_keys(model)
    current = posterior_of(model)
    mu = {k: torch.zeros_like(v) if k in bayesian else v for k, v in current.mu.items()}
    sig = {k: torch.full_like(v, sigma) if k in bayesian else torch.zeros_like(v) for k, v in current.mu.items()}
    return GaussianPosterior(mu, sig)


def _bayesian_keys(model: nn.Module) -> set[str]:
    return {_key(path, name) for path, layer in bayesian_layers(model) for name in layer.tensor_names}


def standard_normal_quantile(probability: float) -> float:
    """Phi^{-1}(probability) for the standard normal, probability in (0, 1)."""
    return math.sqrt(2.0) * torch.erfinv(torch.tensor(2.0 * probability - 1.0, dtype=torch.float64)).item()
