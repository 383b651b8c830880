"""Jacobian regularisation (Hutchinson) and the spectral radius (power method)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deq import DEQLayer
from deq.reg import jacobian_reg, spectral_radius

DT = torch.float64


def _linear(dim=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = nn.Parameter(torch.randn(dim, dim, dtype=DT, generator=gen) / dim ** 0.5)
    return W, (lambda z, x: z @ W.T + x)


def test_hutchinson_matches_frobenius_norm_within_monte_carlo_error():
    """Linear f: J = W per sample, ||J||_F^2 / D exactly known; Var ||eps^T W||^2 = 2 ||W W^T||_F^2."""
    dim, batch, probes = 6, 4, 500
    W, f = _linear(dim)
    z = torch.zeros(batch, dim, dtype=DT)
    est = jacobian_reg(f, z, z, n_probes=probes,
                       generator=torch.Generator().manual_seed(1)).detach()
    exact = (W.detach() ** 2).sum() / dim
    sigma = (2 * torch.linalg.matrix_norm(W.detach() @ W.detach().T) ** 2 / (probes * batch)).sqrt() / dim
    assert abs(float(est) - float(exact)) < 4 * float(sigma)
    assert float(sigma) < 0.05 * float(exact)  # the check has teeth


def test_hutchinson_gradient_is_exact_for_its_probes_and_unbiased():
    """d/dW of (1/(N B D)) sum ||eps W||^2 is (2/(N B D)) (E^T E) W, with the very probes drawn.

    Its expectation is the gradient of ||W||_F^2 / D, 2 W / D.
    """
    dim, batch, probes, seed = 5, 3, 400, 7
    W, f = _linear(dim, seed=3)
    z = torch.zeros(batch, dim, dtype=DT)
    reg = jacobian_reg(f, z, z, n_probes=probes, generator=torch.Generator().manual_seed(seed))
    (grad,) = torch.autograd.grad(reg, W)

    gen = torch.Generator().manual_seed(seed)
    eps = torch.cat([torch.randn(batch, dim, dtype=DT, generator=gen) for _ in range(probes)])
    torch.testing.assert_close(grad, 2 * eps.T @ eps @ W.detach() / (probes * batch * dim), rtol=1e-12,
                               atol=1e-14)
    expected = 2 * W.detach() / dim
    rel = torch.linalg.matrix_norm(grad - expected) / torch.linalg.matrix_norm(expected)
    assert float(rel) < 0.15  # Monte-Carlo error ~ sqrt(2/(N B)) ~ 0.04 per entry of E^T E / (N B)


def test_jacobian_reg_is_differentiable_for_nonlinear_f():
    """gradcheck w.r.t. W and x with the probes fixed by a seeded generator (double backward of tanh)."""
    dim = 3
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(dim, dim, dtype=DT, generator=gen).requires_grad_()
    x = torch.randn(2, dim, dtype=DT, generator=gen).requires_grad_()
    z = torch.randn(2, dim, dtype=DT, generator=gen)

    def reg(W, x):
        f = lambda z, x: torch.tanh(z @ W.T + x)
        return jacobian_reg(f, z, x, n_probes=3, generator=torch.Generator().manual_seed(5))

    assert torch.autograd.gradcheck(reg, (W, x))


def test_jacobian_reg_on_a_layer_output_trains_the_layer():
    """The documented use: add it to the loss on the layer's z; the gradient reaches f's parameters."""
    W, f = _linear(4)
    layer = DEQLayer(f, tol=1e-8)
    x = torch.randn(3, 4, dtype=DT)
    z = layer(x)
    loss = z.pow(2).mean() + 0.1 * jacobian_reg(f, z, x, n_probes=2)
    loss.backward()
    assert W.grad is not None and bool(torch.isfinite(W.grad).all())


def test_jacobian_reg_tuple_state():
    """z = (h, c) with f = (A h, B c): ||J||_F^2 = ||A||_F^2 + ||B||_F^2, D = dh + dc."""
    gen = torch.Generator().manual_seed(2)
    A = torch.randn(3, 3, dtype=DT, generator=gen)
    B = torch.randn(2, 2, dtype=DT, generator=gen)
    f = lambda z, x: (z[0] @ A.T, z[1] @ B.T)
    z = (torch.zeros(5, 3, dtype=DT), torch.zeros(5, 2, dtype=DT))
    est = jacobian_reg(f, z, None, n_probes=2000,
                       generator=torch.Generator().manual_seed(0)).detach()
    exact = ((A ** 2).sum() + (B ** 2).sum()) / 5
    assert abs(float(est) / float(exact) - 1) < 0.05


def test_n_probes_checked():
    _, f = _linear()
    with pytest.raises(ValueError, match="n_probes must be an integer >= 1"):
        jacobian_reg(f, torch.zeros(1, 6, dtype=DT), None, n_probes=0)


def test_spectral_radius_of_symmetric_linear_map():
    dim = 6
    gen = torch.Generator().manual_seed(4)
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=DT, generator=gen))
    eig = torch.tensor([-0.9, 0.7, 0.5, -0.3, 0.2, 0.1], dtype=DT)
    S = Q @ torch.diag(eig) @ Q.T
    z = torch.randn(3, dim, dtype=DT, generator=gen)
    rho = spectral_radius(lambda z, x: z @ S.T + x, z, torch.zeros_like(z), n_iter=100,
                          generator=torch.Generator().manual_seed(0))
    exact = torch.linalg.eigvalsh(S).abs().max()
    assert rho.shape == (3,) and not rho.requires_grad
    torch.testing.assert_close(rho, exact.expand(3), rtol=1e-10, atol=0)


def test_spectral_radius_per_sample_of_nonlinear_f():
    """tanh(z W^T): J_b = diag(1 - tanh^2) W differs per sample; compare with eigvals of each J_b."""
    dim = 4
    gen = torch.Generator().manual_seed(6)
    W = torch.randn(dim, dim, dtype=DT, generator=gen)
    W = (W + W.T) / 2
    z = torch.randn(2, dim, dtype=DT, generator=gen)
    f = lambda z, x: torch.tanh(z @ W.T)
    rho = spectral_radius(f, z, None, n_iter=400, generator=torch.Generator().manual_seed(0))
    for b in range(2):
        J = torch.autograd.functional.jacobian(lambda v: f(v[None], None)[0], z[b])
        assert abs(float(rho[b]) - float(torch.linalg.eigvals(J).abs().max())) < 1e-6


def test_n_iter_checked():
    with pytest.raises(ValueError, match="n_iter must be an integer >= 1"):
        spectral_radius(lambda z, x: z, torch.zeros(1, 2), None, n_iter=0)
