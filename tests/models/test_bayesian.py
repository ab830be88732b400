"""Mean-field Gaussian layers: closed-form KL, samples that spread as sigma says, and a conversion that keeps
every clbench model's shapes and outputs (means = the deterministic weights)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.distributions import Normal
from torch.distributions import kl_divergence as torch_kl

from clbench.models import MLP, AlexNet, BayesConv2d, BayesLinear, ResNet18, bayesianize
from clbench.models.bayesian import (
    gaussian_kl,
    isotropic_prior,
    kl_divergence,
    load_posterior,
    posterior_of,
    set_prior,
    softplus_inverse,
)


def test_gaussian_kl_matches_torch_closed_form():
    torch.manual_seed(0)
    mu, prior_mu = torch.randn(7, 5), torch.randn(7, 5)
    sigma, prior_sigma = torch.rand(7, 5) + 0.05, torch.rand(7, 5) + 0.05
    expected = torch_kl(Normal(mu, sigma), Normal(prior_mu, prior_sigma)).sum()
    torch.testing.assert_close(gaussian_kl(mu, sigma, prior_mu, prior_sigma), expected)
    assert float(gaussian_kl(mu, sigma, mu, sigma)) == pytest.approx(0.0, abs=1e-5)


def test_layer_kl_sums_weight_and_bias_against_its_prior_buffers():
    torch.manual_seed(0)
    layer = BayesLinear(nn.Linear(6, 4), init_sigma=0.1, prior_sigma=0.5)
    with torch.no_grad():
        layer.weight_rho.copy_(torch.randn(4, 6))
        layer.bias_prior_mu.copy_(torch.randn(4))
    expected = sum(
        torch_kl(
            Normal(layer.mu(n), layer.sigma(n)),
            Normal(getattr(layer, f"{n}_prior_mu"), getattr(layer, f"{n}_prior_sigma")),
        ).sum()
        for n in ("weight", "bias")
    )
    torch.testing.assert_close(layer.kl(), expected)
    kl_value = layer.kl()
    kl_value.backward()
    assert layer.weight_mu.grad is not None and layer.weight_rho.grad is not None


def test_sigma_is_softplus_of_rho_and_the_inverse_round_trips():
    sigma = torch.tensor([1e-6, 1e-3, 0.05, 1.0, 25.0])
    torch.testing.assert_close(nn.functional.softplus(softplus_inverse(sigma)), sigma, rtol=1e-4, atol=0)


def test_samples_spread_with_sigma_around_the_mean_and_eval_uses_the_mean():
    torch.manual_seed(0)
    layer = BayesLinear(nn.Linear(3, 2), init_sigma=0.01)
    target = torch.tensor([[0.01, 0.1, 1.0], [0.5, 0.2, 0.05]])
    with torch.no_grad():
        layer.weight_rho.copy_(softplus_inverse(target))
    layer.train()
    draws = torch.stack([layer.tensor("weight") for _ in range(20000)])
    torch.testing.assert_close(draws.std(0), target, rtol=0.03, atol=0)
    torch.testing.assert_close(draws.mean(0), layer.weight_mu.detach(), rtol=0, atol=0.03)
    layer.eval()
    assert torch.equal(layer.tensor("weight"), layer.weight_mu)


def test_conv_layer_samples_and_matches_the_deterministic_conv_at_its_mean():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    layer = BayesConv2d(conv, init_sigma=0.1)
    x = torch.randn(2, 3, 8, 8)
    layer.eval()
    torch.testing.assert_close(layer(x), conv(x))
    layer.train()
    assert not torch.allclose(layer(x), layer(x))


def _mlp() -> MLP:
    torch.manual_seed(0)
    return MLP((1, 6, 6), [2, 2, 3], hidden=[16, 8])


def test_bayesianize_mlp_keeps_shapes_heads_and_outputs():
    model = _mlp()
    bayes = bayesianize(copy.deepcopy(model), init_sigma=1e-2, prior_sigma=0.3)
    assert not any(isinstance(m, nn.Linear) for m in bayes.modules())
    deterministic = dict(model.named_parameters())
    posterior = posterior_of(bayes)
    assert posterior.mu.keys() == deterministic.keys()
    for key, value in deterministic.items():
        assert posterior.mu[key].shape == value.shape and torch.equal(posterior.mu[key], value)
        torch.testing.assert_close(posterior.sigma[key], torch.full_like(value, 1e-2))
    x = torch.randn(5, 1, 6, 6)
    bayes.eval()
    for task in range(3):
        torch.testing.assert_close(bayes(x, task), model(x, task))
    assert len(bayes.shared_parameters()) == 2 * len(list(model.shared_parameters()))
    bayes.train()
    assert bayes(x, 1).shape == (5, 2) and not torch.allclose(bayes(x, 1), bayes(x, 1))


@pytest.mark.parametrize(
    "build",
    [
        lambda: AlexNet((3, 32, 32), [2, 2], channels=[8, 8, 8], hidden=[16, 16]),
        lambda: ResNet18((3, 32, 32), [2, 2], nf=4),
    ],
    ids=["alexnet", "resnet18"],
)
def test_bayesianize_conv_models_forward_at_the_mean(build):
    torch.manual_seed(0)
    model = build().eval()
    bayes = bayesianize(copy.deepcopy(model)).eval()
    assert not any(isinstance(m, nn.Conv2d | nn.Linear) for m in bayes.modules())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(bayes(x, 0), model(x, 0))
    # batch-norm affine weights stay deterministic: sigma 0
    posterior = posterior_of(bayes)
    assert posterior.mu.keys() == dict(model.named_parameters()).keys()
    norms = [
        f"{path}.{name}"
        for path, module in model.named_modules()
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d)
        for name, _ in module.named_parameters(recurse=False)
    ]
    assert norms and all(not posterior.sigma[k].any() for k in norms)


def test_posterior_and_prior_load_and_kl_is_zero_at_the_prior():
    bayes = bayesianize(_mlp(), init_sigma=1e-2, prior_sigma=0.3)
    prior = isotropic_prior(bayes, 0.2)
    set_prior(bayes, prior)
    load_posterior(bayes, prior)
    assert float(kl_divergence(bayes)) == pytest.approx(0.0, abs=1e-3)
    loaded = posterior_of(bayes)
    for key in prior.mu:
        torch.testing.assert_close(loaded.mu[key], prior.mu[key])
        torch.testing.assert_close(loaded.sigma[key], prior.sigma[key])


def test_bayesianize_rejects_a_model_without_layers():
    with pytest.raises(ValueError, match=r"no nn\.Linear or nn\.Conv2d"):
        bayesianize(nn.Sequential(nn.ReLU()))
