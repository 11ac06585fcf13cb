"""The Hessian spectrum of a training loss, from Hessian-vector products (RISE paper, Fig. 2).

H is the Hessian of the mean cross-entropy over a fixed set of batches (the model in eval mode,
so BN uses its running statistics and the loss is a fixed function of the parameters). It is
never formed: `hvp_operator` returns v ↦ H v by double backward (grad of <grad L, v>), and
everything below needs only that map, on flat vectors over all trainable parameters.

With a `keep` mask (1 = kept coordinate, 0 = pruned weight) the operator is P H P, P the
projection onto the kept coordinates: the Hessian of the loss *restricted to the ticket's
trainable weights* (pruned weights held at zero). Its spectrum on the kept subspace is what
the functions below estimate when their probes are masked the same way (`rademacher(.., keep)`).

- `slq`: stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017; PyHessian's `density`): per
  Rademacher probe, m Lanczos steps with full re-orthogonalisation; the eigenpairs (θ_i, s_i) of
  the m x m tridiagonal T give Ritz values θ_i with weights s_i[0]², an m-node quadrature of
  the spectral density that integrates polynomials up to degree 2m-1 exactly for that probe.
- `power_iteration`: the eigenvalue of largest magnitude (the top one when it is positive).
- `hutchinson_trace`: tr(H) ≈ mean of vᵀHv over Rademacher probes v.
- `broadened_density`: Ritz weights convolved with a Gaussian (PyHessian's `density_generate`:
  σ² = 1e-5 · max(1, λ_max - λ_min)), the curve PyHessian (and so, presumably, Fig. 2) plots
  on a log scale.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ------------------------------------------------------------------ flat vectors
def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def flatten(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vec: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [part.view_as(p) for part, p in zip(vec.split([p.numel() for p in like]), like)]


def keep_vector(model: nn.Module, mask: dict[str, torch.Tensor]) -> torch.Tensor:
    """Flat 0/1 vector over `trainable(model)`: a parameter named in `mask` takes its mask, others are all kept."""
    names = {id(p): n for n, p in model.named_parameters()}
    return flatten([mask[names[id(p)]].to(p.dtype) if names[id(p)] in mask else torch.ones_like(p)
                    for p in trainable(model)]).detach()


def rademacher(n: int, gen: torch.Generator, keep: torch.Tensor | None = None,
               dtype=torch.float32) -> torch.Tensor:
    """±1 entries (0 where `keep` is 0)."""
    v = torch.randint(0, 2, (n,), generator=gen).to(dtype) * 2 - 1
    return v if keep is None else v * keep.to(dtype)


# ------------------------------------------------------------------ the operator
def hvp_operator(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                 keep: torch.Tensor | None = None):
    """v ↦ (P) H (P) v for the mean cross-entropy over all images of `batches` (model put in eval mode).

    Each batch adds its share (sum of its losses / total images) by double backward, so the
    result does not depend on how the images are split into batches."""
    model.eval()
    params = trainable(model)
    total = sum(len(y) for _, y in batches)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        if keep is not None:
            v = v * keep
        vs = unflatten(v.to(params[0].dtype), params)
        out = torch.zeros_like(v)
        for x, y in batches:
            loss = F.cross_entropy(model(x), y, reduction="sum") / total
            grads = torch.autograd.grad(loss, params, create_graph=True)
            out += flatten(torch.autograd.grad(grads, params, grad_outputs=vs)).to(v.dtype)
        return out if keep is None else out * keep

    return hvp


@torch.no_grad()
def mean_loss(model: nn.Module, batches) -> float:
    model.eval()
    total = sum(len(y) for _, y in batches)
    return sum(float(F.cross_entropy(model(x), y, reduction="sum")) for x, y in batches) / total


# ------------------------------------------------------------------ estimators
def lanczos(hvp, v0: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`steps` Lanczos iterations from v0 with full re-orthogonalisation → the tridiagonal's
    eigenvalues (Ritz values, ascending) and the squared first components of its eigenvectors
    (quadrature weights, summing to 1). Stops early when the Krylov space is exhausted."""
    q = v0 / v0.norm()
    basis = torch.zeros(steps, q.numel(), dtype=q.dtype)
    alphas, betas = [], []
    for j in range(steps):
        basis[j] = q
        w = hvp(q)
        alphas.append(float(w @ q))
        Q = basis[:j + 1]
        for _ in range(2):                           # Gram-Schmidt twice ("twice is enough")
            w = w - Q.T @ (Q @ w)
        beta = float(w.norm())
        if j == steps - 1 or beta <= 1e-8 * max(abs(a) for a in alphas):
            break
        betas.append(beta)
        q = w / beta
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    theta, S = torch.linalg.eigh(T)
    return theta, S[0] ** 2


def slq(hvp, n: int, steps: int, probes: int, gen: torch.Generator, keep: torch.Tensor | None = None,
        dtype=torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Stochastic Lanczos quadrature: (Ritz values, weights) for each of `probes` Rademacher probes."""
    dim = n if keep is None else int(keep.sum())
    return [lanczos(hvp, rademacher(n, gen, keep, dtype), min(steps, dim)) for _ in range(probes)]


def power_iteration(hvp, n: int, gen: torch.Generator, keep: torch.Tensor | None = None,
                    iters: int = 100, tol: float = 1e-4, dtype=torch.float32) -> tuple[float, int]:
    """Eigenvalue of largest |λ| (Rayleigh quotient) and the iterations used; stops when it
    changes by less than `tol` relative."""
    v = torch.randn(n, generator=gen, dtype=dtype)
    v = v if keep is None else v * keep.to(dtype)
    v = v / v.norm()
    lam = None
    for i in range(1, iters + 1):
        w = hvp(v)
        new = float(w @ v)
        v = w / w.norm()
        if lam is not None and abs(new - lam) <= tol * abs(new):
            return new, i
        lam = new
    return lam, iters


def hutchinson_trace(hvp, n: int, probes: int, gen: torch.Generator, keep: torch.Tensor | None = None,
                     dtype=torch.float32) -> tuple[float, float]:
    """tr(H) ≈ mean vᵀHv over Rademacher v, with its standard error."""
    samples = torch.tensor([float((v := rademacher(n, gen, keep, dtype)) @ hvp(v)) for _ in range(probes)],
                           dtype=torch.float64)
    err = float(samples.std() / math.sqrt(probes)) if probes > 1 else float("nan")
    return float(samples.mean()), err


# ------------------------------------------------------------------ the density
def spectral_moment(runs, power: int) -> float:
    """∫ λ^power dρ(λ) under the SLQ density (mean over probes) = (1/n) tr(H^power) in expectation."""
    return float(sum((w * theta ** power).sum() for theta, w in runs) / len(runs))


def mass_near_zero(runs, eps: float = 1e-3) -> float:
    """Fraction of spectral mass the quadrature puts at |λ| < eps (mean over probes)."""
    return float(sum(w[theta.abs() < eps].sum() for theta, w in runs) / len(runs))


def density_grid(runs, points: int = 10000, overhead: float = 0.01) -> tuple[torch.Tensor, float]:
    """PyHessian's grid (the Ritz range ± overhead, 10,000 points: finer than σ) and Gaussian
    variance σ² = 1e-5·max(1, range)."""
    lo = sum(float(t.min()) for t, _ in runs) / len(runs) - overhead
    hi = sum(float(t.max()) for t, _ in runs) / len(runs) + overhead
    return torch.linspace(lo, hi, points, dtype=torch.float64), 1e-5 * max(1.0, hi - lo)


def broadened_density(runs, grid: torch.Tensor, sigma2: float) -> torch.Tensor:
    """Σ_i w_i N(λ; θ_i, σ²), averaged over probes and normalised to integrate to 1 on `grid`."""
    dens = torch.zeros_like(grid)
    for theta, w in runs:
        gauss = torch.exp(-(grid[:, None] - theta[None, :]) ** 2 / (2 * sigma2)) / math.sqrt(2 * math.pi * sigma2)
        dens += gauss @ w
    step = float(grid[1] - grid[0])
    return dens / max(float(dens.sum()) * step, 1e-300)
