"""Stage 2 — filter distance between pretraining epochs: when does the winning ticket emerge?

    python 02_filter_distance.py --config yaml/quick_c10.yaml
    python 02_filter_distance.py --config yaml/quick_c10.yaml --compare runs/quick_dense   # + compare.png
    python 02_filter_distance.py --config yaml/quick_c10.yaml --set prune.ratio=0.8        # top-k at p = 0.8
    python 02_filter_distance.py --config my.yaml --from e1.pth e2.pth e3.pth              # weights trained elsewhere

Reads runs/NAME/pretrain/epoch_*.pt (any method) and writes runs/NAME/distance/: config.yaml,
filter_distance.csv (every layer and ordered epoch pair; network_mean/network_weighted rows),
early_bird.csv, heatmap_<layer>.png, distance_to_final.png, early_bird.png, [compare.png],
summary.json, and TensorBoard scalars. --tag T writes distance_T/ instead; an existing distance
folder made with other analysis settings (prune.ratio, distance.*) is only replaced with --force.
The metric and its conventions: docs/method.md and common/distance.py. Next: 03_prune.py.
"""
import json
from pathlib import Path

from common.checkpoint import write_text_atomic
from common.cli import python_command, run_stage, stage_command
from common.config import load_config, run_dir_of, stage_parser
from common.runs import check_analysis_dir, finished, lock_stage_dir, save_config, unlocks_at_end, write_csv
from common.tb import Scalars

# torch, DeepSpeed and the modules built on them take seconds to load: each function imports them
# where it needs them, so a config error is one line before any of that


@unlocks_at_end
def main(argv=None):
    p = stage_parser(__doc__.splitlines()[0])
    p.add_argument("--from", dest="sources", nargs="+", default=None, metavar="FILE",
                   help="checkpoints or plain state_dicts of the config's model (trained elsewhere), in epoch "
                        "order, instead of the run's pretrain/epoch_*.pt")
    p.add_argument("--compare", nargs="+", default=[], metavar="DIR",
                   help="other run folders (runs/X) whose distance to final is drawn beside this run's")
    p.add_argument("--tag", default=None, help="output folder distance_TAG (default: distance)")
    p.add_argument("--force", action="store_true", help="replace a distance folder made with other settings")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.set)
    # the config is valid: only now load torch, DeepSpeed and the training modules
    from common.distance_plots import plot_compare, plot_distance_to_final, plot_heatmap, plot_mask_heatmap, safe_name
    from common.distance_series import analyse, consecutive_distances, distance_rows, load_series, mask_rows, to_final
    from common.emergence import EB_EPS, EB_HISTORY, early_bird_epoch, emergence_epoch
    from common.prune import check_tag
    run = run_dir_of(args, cfg)
    out = run / (f"distance_{check_tag(args.tag)}" if args.tag else "distance")
    made_by = stage_command("01_pretrain_loft.py", args, cfg)
    from common.models import arch_of
    series = load_series(run / "pretrain", made_by, cfg.prune.kind, cfg.importable,
                         files=[Path(f) for f in args.sources] if args.sources else None,
                         plain_arch=arch_of(cfg.model, cfg.data) if args.sources else None)
    print(f"{run / 'pretrain'}: epochs {series.epochs[0]}..{series.epochs[-1]} of {series.arch['name']} "
          f"(width {series.arch['width']}, method {series.method}), {len(series.norms)} prunable layers")

    lock_stage_dir(out)  # one writer: a second run into this folder is refused, naming this one
    check_analysis_dir(out, cfg.to_dict(), ("prune.ratio", "prune.kind", "distance."), args.force)
    res = analyse(series, cfg.prune.ratio)
    ep = series.epochs
    filt = emergence_epoch(consecutive_distances(res), cfg.distance.emergence_eps, cfg.distance.emergence_window)
    bird = early_bird_epoch(res.mask_dist, ep)
    marks = {"filter emergence": None if filt is None else ep[filt], "early bird": None if bird is None else ep[bird]}
    curves = {f"{run} ({series.method})": (ep, to_final(res))}
    for other in map(Path, args.compare):  # the same network-mean curve of every other run (paper Fig. 4)
        s = load_series(other / "pretrain", f"{python_command()} 01_pretrain_loft.py --config yaml/<NAME>.yaml --run-dir {other}",
                        cfg.prune.kind, cfg.importable)
        curves[f"{other} ({s.method})"] = (s.epochs, to_final(analyse(s, cfg.prune.ratio)))

    save_config(cfg.to_dict(), out / "config.yaml")
    write_csv(distance_rows(ep, res), out / "filter_distance.csv")
    write_csv(mask_rows(ep, res.mask_dist), out / "early_bird.csv")
    for layer, d in res.filters.items():
        plot_heatmap(ep, d, layer, res.k.get(layer), out / f"heatmap_{safe_name(layer)}.png")
    plot_distance_to_final(ep, res, marks, out / "distance_to_final.png")
    plot_mask_heatmap(ep, res.mask_dist, cfg.prune.ratio, out / "early_bird.png")
    if args.compare:
        plot_compare(curves, out / "compare.png")

    summary = {
        "run": str(run), "method": series.method, "arch": series.arch, "epochs": ep,
        "prune_ratio": cfg.prune.ratio, "layers": {l: {"filters": n.shape[1], "k": res.k[l], "params": series.params[l]}
                                                   for l, n in series.norms.items()},
        "filter_emergence_epoch": marks["filter emergence"],
        "filter_emergence_rule": f"first e with network-mean normalised top-k F(e+j+1, e+j) < {cfg.distance.emergence_eps} "
                                 f"for j = 0..{cfg.distance.emergence_window - 1}",
        "early_bird_epoch": marks["early bird"],
        "early_bird_rule": (f"first e with mask distance <= {EB_EPS} to each of the previous {EB_HISTORY} "
                            "trained epochs (the queue starts at epoch 1)") if series.gammas.shape[1] else
                           "not applicable: the model has no BatchNorm, whose scales Early-Bird masks rank",
        "distance_to_final": {str(e): round(v, 5) for e, v in zip(ep, to_final(res))},
        "distance_to_final_weighted": {str(e): round(v, 5) for e, v in zip(ep, to_final(res, "network_weighted"))},
        "mask_distance_to_final": {str(e): round(v, 5) for e, v in zip(ep, res.mask_dist[-1].tolist())},
        "consecutive": {f"{a}-{b}": round(v, 5) for a, b, v in zip(ep, ep[1:], consecutive_distances(res))},
    }
    write_text_atomic(json.dumps(summary, indent=1), out / "summary.json")
    tb = Scalars(out, True)
    for i, (e, v, m) in enumerate(zip(ep, to_final(res), res.mask_dist[-1].tolist())):
        tb.add({"distance_to_final": v, "mask_distance_to_final": m,
                **({"distance_to_previous": consecutive_distances(res)[i - 1]} if i else {})}, e)
    tb.close()
    for name, rule in (("filter emergence", "filter_emergence_rule"), ("early bird", "early_bird_rule")):
        print(f"{name + ' epoch:':24s}{marks[name] if marks[name] is not None else 'not reached':>12}   ({summary[rule]})")
    print("epoch  F_topk(final, e)  F_topk(e, e-1)  mask dist to final   [F: network mean, normalised top-k]")
    for i, (e, v, m) in enumerate(zip(ep, to_final(res), res.mask_dist[-1].tolist())):
        step = f"{consecutive_distances(res)[i - 1]:14.4f}" if i else f"{'':14s}"
        print(f"{e:5d}  {v:16.4f}  {step}  {m:18.4f}")
    print(f"wrote {out}/: filter_distance.csv, early_bird.csv, {len(res.filters)} heatmaps, distance_to_final.png, "
          f"early_bird.png{', compare.png' if args.compare else ''}, summary.json")
    finished(out, stage_command("03_prune.py", args, cfg))


if __name__ == "__main__":
    run_stage(main)
