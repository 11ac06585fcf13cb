"""Hessian eigenvalue density of one-shot tickets W^k·M (RISE paper, Fig. 2), on CPU.

    OMP_NUM_THREADS=1 python bench/hessian.py --run-dir runs/hessian_quick --epochs 0,1,6 \
        --keep 0.1,0.25,0.5,1.0 --images 128 --lanczos-steps 30 --power-iters 10 --hutchinson-probes 5
                                                  # docs/img/hessian_density.png: ~10 min on 1 core
    python bench/hessian.py --run-dir runs/NAME --epochs 0,5,10 --images 512 --lanczos-steps 60 --probes 2

For every rewind epoch k and kept fraction R: M keeps the fraction R of the conv/linear weights of
the FINAL pretraining checkpoint (highest epoch_EEE.pt) by global magnitude, exactly as
`03_prune.py --set prune.kind=magnitude --set prune.ratio=1-R` makes it; W^k·M is epoch k's
weights with the pruned ones set to zero. At W^k·M we take the Hessian of the mean training
cross-entropy over a fixed class-balanced set of training images (eval-mode BN: a fixed
function), restricted to the ticket's trainable coordinates (`--space kept`, default: kept
conv/linear weights, BN and biases; pruned weights held at zero, the space a rewound one-shot
ticket is trained in) or over all parameters (`--space all`). Estimated by Hessian-vector
products (double backward): its eigenvalue density by stochastic Lanczos quadrature, its
dominant eigenvalue by power iteration (largest |λ|, signed, as PyHessian; `top_ritz_value` is
Lanczos' largest λ) and its trace by Hutchinson (bench/spectrum.py).

Data: CIFAR from the run's saved config (runs/NAME/pretrain/config.yaml, data.root) or
--data-root. Writes into --out (default RUN/hessian/): hessian.json (per (k, R): top eigenvalue,
trace, spectral mass at |λ| < 1e-3, Ritz values and weights) and hessian_density.png (one
log-scale density panel per R, one row per k). On a shared 2-core CPU, run it with
OMP_NUM_THREADS=1: the double backward of a small net gains nothing from a second thread that
other jobs are using (measured: 4.8 s per HVP with 1 thread, 23 s with 2, on a busy machine).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from common.checkpoint import PretrainEpoch, load, write_text_atomic
from common.cli import run_stage
from common.config import load_config
from common.data import balanced_subset, load_cifar, normalize
from common.errors import UserError
from bench.spectrum import (broadened_density, density_grid, hutchinson_trace, hvp_operator, keep_vector,
                            mass_near_zero, mean_loss, power_iteration, slq, spectral_moment, trainable)
from common.models import build_model
from common.prune import magnitude_mask, maskable_weights

NEAR_ZERO = 1e-3   # |λ| below this counts as "flat" (hessian.json: mass_near_zero)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True, help="runs/NAME, holding pretrain/epoch_EEE.pt")
    p.add_argument("--epochs", default="0", help="rewind epochs k, comma-separated")
    p.add_argument("--keep", default="0.1,0.25,0.5,1.0", help="kept fractions R, comma-separated")
    p.add_argument("--images", type=int, default=256, help="class-balanced training images the loss averages over")
    p.add_argument("--batch-size", type=int, default=128, help="images per double-backward pass (memory only)")
    p.add_argument("--lanczos-steps", type=int, default=30, help="Lanczos steps per SLQ probe (Ritz nodes)")
    p.add_argument("--probes", type=int, default=1, help="SLQ probes (Rademacher start vectors)")
    p.add_argument("--power-iters", type=int, default=20, help="max power iterations (stops at 1e-3 relative change)")
    p.add_argument("--hutchinson-probes", type=int, default=10, help="Rademacher probes for the trace")
    p.add_argument("--space", choices=["kept", "all"], default="kept",
                   help="kept: Hessian over the ticket's unpruned coordinates; all: over every parameter")
    p.add_argument("--seed", type=int, default=0, help="seed of the probes (the same for every (k, R))")
    p.add_argument("--data-root", default=None, help="default: data.root of the run's config")
    p.add_argument("--out", default=None, help="output folder (default: RUN/hessian)")
    args = p.parse_args(argv)
    run, epochs, keeps = Path(args.run_dir), parse_list(args.epochs, int), parse_list(args.keep, float)
    if any(not 0 < r <= 1 for r in keeps):
        raise UserError(f"--keep {args.keep}: fractions must lie in (0, 1]")

    pre = run / "pretrain"
    made_by = f"python 01_pretrain_loft.py --config yaml/NAME.yaml --run-dir {run}"
    if not (pre / "config.yaml").is_file():
        raise UserError(f"{pre / 'config.yaml'}: no pretraining run there (run: {made_by})")
    cfg = load_config(pre / "config.yaml")
    batches = fixed_batches(cfg.data.dataset, args.data_root or cfg.data.root, args.images, args.batch_size)
    final = load(last_epoch(pre, made_by), PretrainEpoch, made_by=made_by)
    arch, final_model = final.arch, build_model(final.arch, cfg.importable)
    names = maskable_weights(final_model)
    masks = {r: magnitude_mask({k: final.model[k] for k in names}, 1.0 - r, "global") for r in keeps}
    print(f"{run}: {arch['name']} width {arch['width']}, {sum(p.numel() for p in trainable(final_model)):,} params; "
          f"mask from epoch {final.epoch}; {args.images} images; SLQ {args.probes}x{args.lanczos_steps} steps")

    results = []
    for k in epochs:
        state = load(pre / f"epoch_{k:03d}.pt", PretrainEpoch, made_by=made_by).model
        for r in keeps:
            res = analyse(arch, state, masks[r], batches, args)
            results.append({"epoch": k, "keep": r, **res})
            print(f"k={k:<3} R={r:<5} loss {res['loss']:.4f}  dominant {res['top_eigenvalue']:.4g}  "
                  f"λ in [{res['bottom_ritz_value']:.3g}, {res['top_ritz_value']:.4g}]  "
                  f"trace {res['trace']:.4g}  mass|λ|<{NEAR_ZERO:g} {res['mass_near_zero']:.3f}  "
                  f"({res['seconds']:.0f} s)")

    out = Path(args.out) if args.out else run / "hessian"
    report = {"run_dir": str(run), "arch": arch, "mask_epoch": final.epoch,
              "mask": "global magnitude, conv/linear weights", "space": args.space, "images": args.images,
              "lanczos_steps": args.lanczos_steps, "probes": args.probes,
              "power_iters": args.power_iters, "hutchinson_probes": args.hutchinson_probes, "seed": args.seed,
              "near_zero": NEAR_ZERO, "results": results}
    write_text_atomic(json.dumps(report, indent=1), out / "hessian.json")
    plot(results, epochs, keeps, out / "hessian_density.png", f"{arch['name']} w{arch['width']}, {args.images} images")
    print(f"wrote {out / 'hessian.json'} and {out / 'hessian_density.png'}")


def parse_list(text: str, typ) -> list:
    try:
        return [typ(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{text!r}: expected comma-separated {typ.__name__}s") from None


def last_epoch(folder: Path, made_by: str) -> Path:
    epochs = sorted(int(m.group(1)) for f in folder.glob("epoch_*.pt")
                    if (m := re.fullmatch(r"epoch_(\d+)\.pt", f.name)))
    if not epochs:
        raise UserError(f"{folder}: no pretraining checkpoints epoch_EEE.pt (run: {made_by})")
    return folder / f"epoch_{epochs[-1]:03d}.pt"


def fixed_batches(dataset: str, root: str, images: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first images/C training images of every class, normalised, no augmentation, in batches.
    (balanced_subset takes the first per class, so these lie inside any larger balanced subset,
    e.g. the data.train_subset the run was pretrained on.)"""
    if dataset not in ("cifar10", "cifar100"):
        raise UserError(f"data.dataset={dataset}: the Hessian benchmark reads CIFAR-10/100 only")
    ds = load_cifar(root, dataset, train=True)
    ds = ds.subset(balanced_subset(ds.labels, images))
    x, y = normalize(ds.images, ds.mean, ds.std), ds.labels
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]


def analyse(arch: dict, state: dict, mask: dict, batches, args) -> dict:
    """Spectrum of the loss Hessian at W^k·M (see the module docstring)."""
    t0 = time.time()
    model = build_model(arch)
    model.load_state_dict({k: v * mask[k] if k in mask else v for k, v in state.items()})
    n = sum(p.numel() for p in trainable(model))
    keep = keep_vector(model, mask) if args.space == "kept" else None
    dim = n if keep is None else int(keep.sum())
    hvp = hvp_operator(model, batches, keep)
    gen = torch.Generator().manual_seed(args.seed)
    runs = slq(hvp, n, args.lanczos_steps, args.probes, gen, keep)
    top, iters = power_iteration(hvp, n, gen, keep, args.power_iters, tol=1e-3)
    trace, trace_err = hutchinson_trace(hvp, n, args.hutchinson_probes, gen, keep)
    near = mass_near_zero(runs, NEAR_ZERO)
    return {
        "params": n, "dim": dim, "loss": mean_loss(model, batches),
        # power iteration finds the dominant (largest |λ|) eigenvalue, signed, as PyHessian's
        # `eigenvalues()`; Lanczos' extreme Ritz values are the largest and smallest λ
        "top_eigenvalue": top, "power_iterations": iters, "power_converged": iters < args.power_iters,
        "top_ritz_value": max(float(t.max()) for t, _ in runs),
        "bottom_ritz_value": min(float(t.min()) for t, _ in runs),
        "trace": trace, "trace_stderr": trace_err, "mean_eigenvalue": trace / dim,
        "slq_mean": spectral_moment(runs, 1), "slq_second_moment": spectral_moment(runs, 2),
        "mass_near_zero": near,
        # the same at wider radii: the bulk of tiny eigenvalues is one or two Ritz nodes, so
        # whether it falls inside 1e-3 depends on where that node lands
        "mass_within": {f"{eps:g}": mass_near_zero(runs, eps) for eps in (1e-3, 1e-2, 1e-1)},
        # as if the pruned coordinates were counted too (each an exact zero eigenvalue, as with
        # masks applied in the forward pass, e.g. torch.nn.utils.prune's weight_orig * mask)
        "mass_near_zero_pruned_counted": (dim * near + (n - dim)) / n,
        "ritz_values": [t.tolist() for t, _ in runs], "ritz_weights": [w.tolist() for _, w in runs],
        "seconds": round(time.time() - t0, 1),
    }


def plot(results: list[dict], epochs: list[int], keeps: list[float], path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(epochs), len(keeps), figsize=(2.6 * len(keeps), 1.9 * len(epochs) + 0.6),
                             sharex="row", squeeze=False)
    for res in results:
        i, j = epochs.index(res["epoch"]), keeps.index(res["keep"])
        runs = [(torch.tensor(t, dtype=torch.float64), torch.tensor(w, dtype=torch.float64))
                for t, w in zip(res["ritz_values"], res["ritz_weights"])]
        grid, sigma2 = density_grid(runs)
        dens = broadened_density(runs, grid, sigma2)
        ax = axes[i][j]
        ax.semilogy(grid.numpy(), dens.clamp_min(1e-300).numpy(), lw=0.8)
        ax.set_ylim(1e-9 * float(dens.max()), 5 * float(dens.max()))
        within = res["mass_within"]
        ax.text(0.97, 0.95, f"λmax {res['top_ritz_value']:.3g}\ntr {res['trace']:.3g}\n|λ|<1e-3: "
                f"{100 * within['0.001']:.0f}%\n|λ|<1e-2: {100 * within['0.01']:.0f}%", transform=ax.transAxes,
                ha="right", va="top", fontsize=7)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.set_title(f"R = {100 * res['keep']:g} %", fontsize=9)
        if j == 0:
            ax.set_ylabel(f"k = {res['epoch']}\ndensity (log)", fontsize=8)
        if i == len(epochs) - 1:
            ax.set_xlabel("eigenvalue", fontsize=8)
    fig.suptitle(f"Hessian eigenvalue density at $W^k\\cdot M$ ({title})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    run_stage(main)
