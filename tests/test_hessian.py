"""Hessian spectrum tools (bench/spectrum.py) against an exact Hessian; bench/hessian.py end to end."""
import importlib.util
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.func import functional_call, hessian

from common.errors import UserError
from bench.spectrum import (broadened_density, density_grid, flatten, hutchinson_trace, hvp_operator, keep_vector,
                            lanczos, power_iteration, rademacher, slq, spectral_moment, trainable, unflatten)
from conftest import REPO, stage

F64 = torch.float64


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops: a second thread only adds synchronisation (and stalls on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(one_thread):
    """A 235-parameter conv net after 30 SGD steps, its data in two batches and its exact Hessian (torch.func)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()
    x, y = torch.randn(48, 1, 6, 6, dtype=F64), torch.randint(0, 3, (48,))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    params, names = trainable(model), [n for n, _ in model.named_parameters()]

    def loss(flat):
        return F.cross_entropy(functional_call(model, dict(zip(names, unflatten(flat, params))), (x,)), y)

    H = hessian(loss)(flatten(params).detach())
    return model, [(x[:20], y[:20]), (x[20:], y[20:])], H, torch.linalg.eigvalsh(H)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_double_backward_hvp_is_the_exact_hessian_times_v(tiny):
    model, batches, H, _ = tiny
    hvp = hvp_operator(model, batches)
    for seed in range(3):
        v = torch.randn(H.shape[0], generator=gen(seed), dtype=F64)
        torch.testing.assert_close(hvp(v), H @ v, rtol=1e-10, atol=1e-12)


def test_masked_hvp_is_the_hessian_restricted_to_the_kept_coordinates(tiny):
    model, batches, H, _ = tiny
    conv_w = dict(model.named_parameters())["0.weight"]
    lin_w = dict(model.named_parameters())["3.weight"]
    mask = {"0.weight": torch.rand(conv_w.shape, generator=gen(1)) < 0.5,
            "3.weight": torch.rand(lin_w.shape, generator=gen(2)) < 0.3}
    keep = keep_vector(model, mask).to(F64)
    kept = keep.nonzero().squeeze(1)
    assert 0 < len(kept) < H.shape[0] and keep[-3:].tolist() == [1, 1, 1]   # unmasked biases stay kept
    hvp = hvp_operator(model, batches, keep)
    v = torch.randn(H.shape[0], generator=gen(3), dtype=F64)
    expected = torch.zeros_like(v)
    expected[kept] = H[kept][:, kept] @ v[kept]
    torch.testing.assert_close(hvp(v), expected, rtol=1e-10, atol=1e-12)
    # Lanczos run to exhaustion inside the kept subspace finds the restricted Hessian's extreme eigenvalues
    theta, w = slq(hvp, H.shape[0], len(kept), 1, gen(4), keep, dtype=F64)[0]
    restricted = torch.linalg.eigvalsh(H[kept][:, kept])
    assert float(theta.max()) == pytest.approx(float(restricted.max()), rel=1e-8)
    assert float(theta.min()) == pytest.approx(float(restricted.min()), rel=1e-6)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)


def test_lanczos_quadrature_is_exact_for_low_degree_moments_of_its_probe(tiny):
    """m Lanczos nodes integrate λ^p exactly for p ≤ 2m-1: Σ w θ^p = vᵀHᵖv / vᵀv."""
    model, batches, H, _ = tiny
    v = rademacher(H.shape[0], gen(5), dtype=F64)
    theta, w = lanczos(hvp_operator(model, batches), v, steps=3)
    for p in range(1, 6):
        exact = float(v @ torch.linalg.matrix_power(H, p) @ v / (v @ v))
        assert float((w * theta ** p).sum()) == pytest.approx(exact, rel=1e-8, abs=1e-14)


def test_slq_density_matches_the_exact_spectrum(tiny):
    model, batches, H, eig = tiny
    n = H.shape[0]
    # the top eigenvalue from one probe through the double-backward operator
    top = max(float(t.max()) for t, _ in slq(hvp_operator(model, batches), n, 20, 1, gen(6), dtype=F64))
    assert top == pytest.approx(float(eig.max()), rel=0.01)
    # the density's moments need many probes (Rademacher noise): run them on H itself, which
    # the test above shows the operator equals to 1e-10
    runs = slq(lambda v: H @ v, n, 10, 400, gen(7), dtype=F64)
    assert spectral_moment(runs, 1) == pytest.approx(float(eig.mean()), rel=0.05)
    assert spectral_moment(runs, 2) == pytest.approx(float((eig ** 2).mean()), rel=0.05)
    assert max(float(t.max()) for t, _ in runs) == pytest.approx(float(eig.max()), rel=0.01)
    # the broadened density is a probability density whose mean is the spectrum's
    grid, sigma2 = density_grid(runs)
    dens = broadened_density(runs, grid, sigma2)
    step = float(grid[1] - grid[0])
    assert float(dens.sum()) * step == pytest.approx(1.0, rel=1e-9)
    assert float((dens * grid).sum()) * step == pytest.approx(float(eig.mean()), rel=0.05)


def test_power_iteration_and_hutchinson_trace(tiny):
    model, batches, H, eig = tiny
    hvp = hvp_operator(model, batches)
    top, iters = power_iteration(hvp, H.shape[0], gen(8), dtype=F64)
    assert top == pytest.approx(float(eig.max()), rel=0.01) and iters < 100
    trace, err = hutchinson_trace(hvp, H.shape[0], 200, gen(9), dtype=F64)
    assert trace == pytest.approx(float(eig.sum()), rel=0.10)
    assert 0 < err < 0.05 * abs(float(eig.sum()))


def test_bench_hessian_end_to_end(tiny_config, tmp_path, one_thread):
    cfg, run = tiny_config(pretrain={"method": "dense", "epochs": 1}), tmp_path / "run"
    stage("01_pretrain_loft").main(["--config", str(cfg), "--run-dir", str(run)])
    spec = importlib.util.spec_from_file_location("bench_hessian", REPO / "bench" / "hessian.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--run-dir", str(run), "--epochs", "0,1", "--keep", "0.25,1.0", "--images", "20",
                "--lanczos-steps", "4", "--probes", "1", "--power-iters", "3", "--hutchinson-probes", "2"])
    report = json.loads((run / "hessian" / "hessian.json").read_text())
    assert report["mask_epoch"] == 1 and report["space"] == "kept"
    assert [(r["epoch"], r["keep"]) for r in report["results"]] == [(0, 0.25), (0, 1.0), (1, 0.25), (1, 1.0)]
    for r in report["results"]:
        assert {"top_eigenvalue", "trace", "mass_near_zero", "ritz_values", "ritz_weights"} <= set(r)
        assert len(r["ritz_values"]) == 1 and len(r["ritz_values"][0]) == 4
        assert sum(r["ritz_weights"][0]) == pytest.approx(1.0, abs=1e-6)
        assert 0.0 <= r["mass_near_zero"] == r["mass_within"]["0.001"] <= r["mass_within"]["0.1"] <= 1.0
        # R = 25 %: the Hessian lives on the kept conv/linear weights plus BN/biases
        assert r["dim"] == r["params"] if r["keep"] == 1.0 else r["dim"] < 0.5 * r["params"]
    with Image.open(run / "hessian" / "hessian_density.png") as img:
        img.verify()
    with pytest.raises(UserError, match="01_pretrain_loft"):
        bench.main(["--run-dir", str(tmp_path / "nothing")])
