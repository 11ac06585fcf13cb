"""What a researcher reads at the end: 04's short summary, and bench/report.py over a run tree:
per run the unpruned reference and the emergence epochs, results of another lineage (a foreign
ticket, a pretraining redone since) listed apart and marked, repeats of a seed never pooled as
seeds, and a plot with a title, axes, a legend and one point per run."""
import contextlib
import csv
import io
import json
import statistics
import sys

import pytest
import yaml


from conftest import REPO, TINY, _merge, stage

sys.path.insert(0, str(REPO / "bench"))
import report  # noqa: E402

SMALL = {"data": {"train_subset": 256, "test_subset": 100, "eval_batch_size": 100},
         "pretrain": {"epochs": 1, "local_iters": 4}, "finetune": {"epochs": 1, "batch_size": 32, "lr": 0.05}}


def main_of(script, cfg, run, *extra):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        stage(script).main(["--config", str(cfg), "--run-dir", str(run), *extra])
    return out.getvalue()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """runs/a (seed 0, with 02) and runs/b (seed 1), each 01 → 03 → 04; a foreign fine-tune in a of
    b's ticket; runs/c fine-tuned at seed 0, then pretrained again (01 --force) at seed 1: its old
    result is stale, and c repeats b's seed. Returns (root, 04's stdout in a)."""
    root = tmp_path_factory.mktemp("report")
    cfg = root / "small.yaml"
    cfg.write_text(yaml.safe_dump(_merge(TINY, SMALL)))
    runs = root / "runs"
    for name, seed in (("a", 0), ("b", 1), ("c", 0)):
        for script in ("01_pretrain_loft", "03_prune"):
            main_of(script, cfg, runs / name, "--set", f"seed={seed}")
        said = main_of("04_finetune", cfg, runs / name, "--set", f"seed={seed}")
        if name == "a":
            printed = said
    main_of("02_filter_distance", cfg, runs / "a")
    main_of("04_finetune", cfg, runs / "a", "--ticket", str(runs / "b/prune_l1_p50/ticket.pt"), "--tag", "foreign")
    main_of("01_pretrain_loft", cfg, runs / "c", "--force", "--set", "seed=1")
    return runs, printed


def test_04_ends_with_a_short_summary_not_the_json(tree):
    runs, printed = tree
    result = json.loads((runs / "a/finetune_l1_p50_finetune/result.json").read_text())
    summary = printed[printed.index("test accuracy: "):].splitlines()
    assert "{" not in printed and '"lineage"' not in printed
    assert summary[0].startswith(f"test accuracy: best {result['best_test_acc']:.2f} %, final "
                                 f"{result['final_test_acc']:.2f} % after 1 epochs (finetune)")
    assert summary[1].startswith(f"parameters: {result['params_trainable']:,} trainable")
    assert summary[2].startswith(f"training FLOPs: {result['train_flops']:.3g} (")
    assert summary[3] == f"all of it: {runs / 'a/finetune_l1_p50_finetune/result.json'}"


def section(md: str, heading: str) -> str:
    start = md.index(heading)
    end = md.find("\n## ", start + 1)
    return md[start:end if end > 0 else None]


def test_report_lists_foreign_and_stale_results_apart_and_never_pools_a_repeated_seed(tree):
    runs, _ = tree
    md, _ = report.report(runs)
    assert "Seeds [0, 0]" not in md and "Seeds [1, 1]" not in md
    first, second = section(md, "(repeat 1 of 2)"), section(md, "(repeat 2 of 2)")
    assert "Seeds [0, 1] (2 runs: " in first and "Seeds [1] (1 run: " in second and f"{runs / 'c'}" in second
    pooled = next(l for l in first.splitlines() if l.startswith("| l1_p50_finetune |"))
    accs = [json.loads((runs / f"{r}/finetune_l1_p50_finetune/result.json").read_text())["final_test_acc"]
            for r in "ab"]
    cells = [c.strip() for c in pooled.strip("|").split("|")]
    assert cells[1] == "2" and cells[3] == f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}"
    assert not any(l.startswith("| foreign |") for l in md.splitlines())  # not a pooled row
    foreign = next(l for l in first.splitlines() if l.startswith(f"| {runs / 'a'} | foreign |"))
    assert f"**foreign**: ticket {runs / 'b/prune_l1_p50/ticket.pt'} of the pretraining in {runs / 'b/pretrain'}" \
        in foreign
    stale = next(l for l in second.splitlines() if l.startswith(f"| {runs / 'c'} | l1_p50_finetune |"))
    assert "**stale**: pretrain/ was redone after its ticket was made (seed 0 then, 1 now)" in stale
    assert "(no fine-tuned tickets of this lineage yet)" in second  # c's only result is stale


def test_report_gives_each_runs_unpruned_reference_and_emergence_epochs(tree):
    runs, _ = tree
    md, _ = report.report(runs)
    summary = json.loads((runs / "a/distance/summary.json").read_text())
    last = list(csv.DictReader(open(runs / "a/pretrain/metrics.csv", newline="")))[-1]
    row = next(l for l in md.splitlines() if l.startswith(f"| {runs / 'a'} | 0 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{float(last['test_acc']):.2f} (epoch 1)"
    shown = [str(summary[k]) if summary[k] is not None else "not reached"
             for k in ("filter_emergence_epoch", "early_bird_epoch")]
    assert cells[5:7] == shown
    row_b = next(l for l in md.splitlines() if l.startswith(f"| {runs / 'b'} | 1 |"))
    assert row_b.rstrip(" |").endswith("— (no 02) | — (no 02)")


def test_report_plot_has_a_title_axes_a_legend_and_one_point_per_run(tree, tmp_path):
    runs, _ = tree
    _, points = report.report(runs)
    ax = report.figure(points, runs).axes[0]
    assert "Ticket accuracy against training FLOPs" in ax.get_title()
    assert "training FLOPs" in ax.get_xlabel() and "test accuracy" in ax.get_ylabel()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "loft-2 repeat 1 l1_p50_finetune (2 runs)" in legend and "loft-2 repeat 1 unpruned (2 runs)" in legend
    assert "loft-2 repeat 2 unpruned (1 run)" in legend                    # c: stale result not plotted
    assert sum(len(c.get_offsets()) for c in ax.collections) == 5          # a, b, c unpruned; a, b tickets
    report.main([str(runs), "--out", str(tmp_path / "r")])
    assert (tmp_path / "r.png").stat().st_size > 0 and (tmp_path / "r.md").is_file()
