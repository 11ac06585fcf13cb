"""The benchmarks' smoke forms run the real pipelines end to end and produce their tables; the one
way they run a stage (bench/lib.py's run_stage) skips, resumes and starts stages by its rule."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DATA, REPO


def bench(name):
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_perf_prints_ratios(tmp_path):
    bench("perf").main(["--out", str(tmp_path), "--repeats", "1", "--batch", "16", "--threads", "1", "--width", "0.125",
                        "--data-root", str(DATA)])
    text = (tmp_path / "perf.md").read_text()
    for row in ("| fp32 | dense |", "| fp32 | LoFT-2 worker", "| bf16+channels_last | LoFT-4 worker", "| 4 |",
                "| fp32 | 4 |"):
        assert row in text, row
    res = json.loads((tmp_path / "perf.json").read_text())
    for m in res["precisions"].values():
        assert m["loft4_mem"] < m["loft2_mem"] < m["dense_mem"]       # narrower workers hold less
        assert 0 < m["loft4_flop_share"] < m["loft2_flop_share"] < 1
        assert m["dense_epoch_s"] > 0 and m["loft4_epoch_s"] > 0 and m["loft4_fused_round_s"] > 0


def file_times(folder: Path) -> dict[str, int]:
    return {f.name: f.stat().st_mtime_ns for f in folder.iterdir() if f.is_file()}


def test_run_stage_resumes_a_cut_off_stage_skips_a_finished_one_and_starts_a_fresh_one(tiny_config, tmp_path):
    lib = bench("lib")
    cfg, run = tiny_config(), tmp_path / "run"  # LoFT-2, 2 epochs of 20 steps
    pretrain = lib.pretrain_stage(cfg, run, {})
    assert pretrain.outputs == (run / "pretrain/epoch_002.pt", run / "pretrain/comm.json")
    # cut off: its command killed inside epoch 2 (tests/kill_at_step.py), epoch 1's last.pt on disk
    killed = subprocess.run([sys.executable, str(REPO / "tests/kill_at_step.py"), *pretrain.command()[1:]], cwd=REPO,
                            env={**os.environ, "KILL_AT_STEP": "25"}, capture_output=True, start_new_session=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not pretrain.finished() and pretrain.start_flags() == ["--resume"]
    before = file_times(run / "pretrain")
    assert lib.run_stage(pretrain) and pretrain.finished()
    after = file_times(run / "pretrain")
    assert {f: after[f] for f in ("epoch_000.pt", "epoch_001.pt")} == \
        {f: before[f] for f in ("epoch_000.pt", "epoch_001.pt")}  # continued, not started over
    # finished: skipped, every file as it was
    assert lib.run_stage(pretrain) is False and file_times(run / "pretrain") == after
    # fresh: no flag; started but without its output (and no last.pt): --force
    prune = lib.prune_stage(cfg, run, {}, "l1_p50")
    assert prune.start_flags() == [] and lib.run_stage(prune) and prune.finished()
    (run / "prune_l1_p50/ticket.pt").unlink()
    assert prune.start_flags() == ["--force"] and lib.run_stage(prune) and prune.finished()
    # a finished run of fewer epochs is not the run asked for: resumed, and 01 refuses to stretch
    # its cosine schedule, in one line
    longer = lib.pretrain_stage(cfg, run, {"pretrain.epochs": 3})
    assert not longer.finished() and longer.start_flags() == ["--resume"]
    with pytest.raises(lib.StageFailed, match="failed \\(exit 2\\)"):
        lib.run_stage(longer, tmp_path / "log.txt")
    assert "pretrain.epochs was 2" in (tmp_path / "log.txt").read_text()
    assert file_times(run / "pretrain") == after


def test_table_helpers_keep_the_committed_reports_formats(tmp_path):
    # docs/results.md and bench/results/paper*/paper.md (bench/paper.py), bench/report.py's cells
    lib = bench("lib")
    assert [lib.si(x, "FLOP") for x in (9.97e12, 2.3e15, 512)] == ["9.97 TFLOP", "2.30 PFLOP", "512 FLOP"]
    assert [lib.si(x, "B") for x in (0, 301.34e6, 7.8e9)] == ["0 B", "301.34 MB", "7.80 GB"]
    assert [lib.si(x, fmt=".3g") for x in (0, 5e7, 1.234e4)] == ["0", "50M", "12.3k"]
    assert lib.si(2.14e6, fmt=".3g", spread=2.1e6) == "2.14M ± 2.1M"
    assert [lib.mean_std(xs) for xs in ([53.05], [50.0, None, 52.0], [], [None])] == \
        ["53.05", "51.00 ± 1.41", "—", "—"]
    assert lib.read_json(tmp_path / "missing.json") is None and lib.last_row(tmp_path / "missing.csv") == {}


def test_paper_driver_stops_at_its_budget_resumes_skips_and_reports(tmp_path, capsys):
    paper = bench("paper")
    base = ["--smoke", "--only", "rise:resnet32_c10", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
            "--data-root", str(DATA)]
    assert paper.main(["run", *base, "--budget-s", "3"]) == 0          # stopped inside the first stage
    assert "budget of 3.0 s reached during rise:resnet32_c10/seed0/dense:pretrain" in capsys.readouterr().out
    assert not (tmp_path / "runs/rise/resnet32_c10/seed0/dense/pretrain/comm.json").exists()
    assert paper.main(["run", *base]) == 0                              # continues and finishes
    assert "all 7 jobs of rise done" in capsys.readouterr().out     # pretrain; R = 10, 50 %: prune, 1-LOT, RISE
    assert paper.main(["run", *base]) == 0                              # nothing left to do
    out = capsys.readouterr().out
    assert out.count("(done)") == 7
    assert paper.main(["report", *base]) == 0
    md = (tmp_path / "out/paper.md").read_text()
    for row in ("## RISE Fig. 4, resnet32_c10", "| 10 % | RISE-R | 1 |", "| 50 % | 1-LOT-R | 1 |", "| 100 % | full model |"):
        assert row in md, row
    assert (tmp_path / "out/rise_fig4_resnet32_c10.png").stat().st_size > 0
    assert paper.main(["run", "--only", "nope", *base[3:]]) == 2
    assert paper.main(["run", "--only", "rise:resnet20", *base[3:]]) == 2


# ------------------------------------------------------- the matrices' job lists
PAPER_CIFAR = {("dense", 1), ("gpipe", 2), ("localsgd", 2), ("loft", 2), ("gpipe", 4), ("localsgd", 4), ("loft", 4)}
TABLE1 = {  # LoFT Table 1, top to bottom: (model, dataset) → methods (with the Dense Model column), pruning ratios
    ("preresnet18", "cifar10"): (PAPER_CIFAR, {0.8, 0.5}),
    ("preresnet34", "cifar10"): (PAPER_CIFAR, {0.8, 0.5}),
    ("resnet34", "cifar10"): (PAPER_CIFAR, {0.8, 0.5}),
    ("preresnet18", "cifar100"): (PAPER_CIFAR, {0.8, 0.5}),
    ("preresnet34", "cifar100"): (PAPER_CIFAR, {0.8, 0.5}),
    ("resnet34", "cifar100"): (PAPER_CIFAR, {0.8, 0.5}),
    ("preresnet18_in", "imagenet"): (PAPER_CIFAR - {("localsgd", 2)}, {0.8, 0.5, 0.3}),  # the paper ran no Local SGD-2
}
FIG4_PANELS = ("cifar10", "cifar100", "imagenet")          # the paper draws cifar100 and imagenet
RISE_MODELS = {("resnet32", "cifar10"): 180, ("mobilenetv3_small", "cifar10"): 100, ("resnet18_in", "imagenet"): 90}


def jobs_of(paper, *argv):
    """{matrix: its jobs, each with its resolved config} as `run` would run them with these flags."""
    from common.config import load_config
    args = paper.parse_args(["run", "--data-root", "/nowhere", *argv])
    plan, out = paper.Plan(args), {}
    for matrix, panels in paper.selection(args.only).items():
        jobs = paper.unique(paper.matrix_jobs(matrix, plan, Path("/runs"), args.seeds, panels))
        out[matrix] = [(j, load_config(REPO / j.config, [f"{k}={v}" for k, v in j.sets.items()])) for j in jobs]
    return out


def method_of(cfg):
    pc = cfg.pretrain
    return (pc.method, 1 if pc.method == "dense" else pc.workers)


def test_table1_matrix_runs_every_row_of_the_paper_with_its_methods_ratios_and_the_dense_cell():
    paper = bench("paper")
    jobs = jobs_of(paper, "--only", "table1")["table1"]
    rows = {}
    for job, cfg in jobs:
        row = rows.setdefault((cfg.model.arch, cfg.data.dataset), {})
        if job.script == "01_pretrain_loft.py" and cfg.pretrain.data == "full":
            assert cfg.pretrain.epochs == 20 and cfg.model.width == 1.0
            row.setdefault(method_of(cfg), set())
        if job.script == "04_finetune.py" and cfg.pretrain.data == "full":
            assert cfg.finetune.mode == "finetune" and cfg.finetune.epochs == 90 and cfg.prune.kind == "l1"
            row.setdefault(method_of(cfg), set()).add(cfg.prune.ratio)
    assert set(rows) == set(TABLE1)
    for key, (methods, ratios) in TABLE1.items():
        assert set(rows[key]) == methods, key
        for method, tickets in rows[key].items():
            assert tickets == (ratios | {0.0} if method[0] == "dense" else ratios), (key, method)  # 0: no pruning
    shard = {method_of(cfg) for job, cfg in jobs if cfg.pretrain.data == "shard" and job.script == "01_pretrain_loft.py"}
    assert shard == {("localsgd", 4), ("loft", 4)}                        # equal samples, PreResNet-18 C10 only


def test_fig4_fig5_and_rise_matrices_cover_the_papers_panels():
    paper = bench("paper")
    jobs = jobs_of(paper, "--only", "fig4,fig5,rise,table1")
    pretrained = {j.run_dir for j, _ in jobs["table1"] if j.script == "01_pretrain_loft.py"}
    panels = {}
    for job, cfg in jobs["fig4"]:
        if job.script == "02_filter_distance.py":
            assert job.run_dir in pretrained                               # table1's runs, measured again
            panels.setdefault(cfg.data.dataset, set()).add((cfg.model.arch, *method_of(cfg)))
    assert set(panels) == set(FIG4_PANELS)
    for dataset, runs in panels.items():
        arch = "preresnet18_in" if dataset == "imagenet" else "preresnet18"
        assert runs == {(arch, "dense", 1), (arch, "gpipe", 4), (arch, "loft", 2), (arch, "loft", 4)}, dataset
    draws = {}
    for job, cfg in jobs["fig5"]:
        if job.script == "03_prune.py":
            assert (cfg.model.arch, cfg.data.dataset, cfg.prune.ratio) == ("preresnet18", "cifar10", 0.5)
            source = Path(job.flags[job.flags.index("--from") + 1])
            draws.setdefault(method_of(cfg), set()).add(source.name)
    assert draws == {m: {"epoch_005.pt", "epoch_010.pt", "epoch_015.pt", "epoch_020.pt"}
                     for m in (("dense", 1), ("gpipe", 4), ("loft", 4))}
    models = {}
    for job, cfg in jobs["rise"]:
        model = models.setdefault((cfg.model.arch, cfg.data.dataset), {"epochs": set(), "tickets": set()})
        model["epochs"].add(cfg.pretrain.epochs)
        if job.script == "04_finetune.py":
            assert cfg.finetune.epochs == 0 and cfg.pretrain.method == "dense"  # the rest of the schedule from k
            model["tickets"].add((cfg.finetune.mode, round(1 - cfg.prune.ratio, 2), cfg.finetune.rewind_epoch))
    assert set(models) == set(RISE_MODELS)
    for key, epochs in RISE_MODELS.items():
        assert models[key]["epochs"] == {epochs}
        assert models[key]["tickets"] == {(m, r, k) for m in ("rewind", "rise") for r in (0.1, 0.25, 0.5)
                                          for k in (1, 5, 10, 20)}, key


def test_every_matrix_scales_through_the_same_flags():
    paper = bench("paper")
    jobs = jobs_of(paper, "--epochs-scale", "0.25", "--finetune-epochs-scale", "0.1", "--set", "model.width=0.25",
                   "--set", "data.train_subset=4000", "--set", "pretrain.method=dense")
    assert set(jobs) == {"table1", "fig4", "fig5", "rise"}
    for job, cfg in (x for js in jobs.values() for x in js):
        assert cfg.model.width == 0.25 and cfg.data.train_subset == 4000
    t1 = {method_of(c) for j, c in jobs["table1"]}
    assert ("loft", 4) in t1                                   # the matrix's own keys win over --set
    for job, cfg in jobs["table1"]:
        assert cfg.pretrain.epochs == 5
        if job.script == "04_finetune.py":
            assert cfg.finetune.epochs == 9 and cfg.finetune.milestones == [3, 6, 8]   # 31 / 61 / 81 of 90
    resnet32 = [c for j, c in jobs["rise"] if c.model.arch == "resnet32"]
    assert {c.pretrain.epochs for c in resnet32} == {45}
    assert {tuple(c.pretrain.milestones) for c in resnet32} == {(20, 30)}      # 80 / 120 of 180 epochs
    assert {c.finetune.rewind_epoch for c in resnet32 if c.finetune.epochs == 0} == {1, 2, 5}  # k 1 5 10 20, / 4
    mobilenet = [c for j, c in jobs["rise"] if c.model.arch == "mobilenetv3_small"]
    assert {c.pretrain.warmup_epochs for c in mobilenet} == {1.25}             # 5 of 100 epochs
    assert {int(j.flags[j.flags.index("--from") + 1][-6:-3]) for j, _ in jobs["fig5"] if j.script == "03_prune.py"} \
        == {1, 2, 4, 5}                                                          # epochs 5..20, / 4, rounded


def test_methods_and_rise_keep_pick_a_subset_and_bad_values_stop_in_one_line(capsys):
    paper = bench("paper")
    jobs = jobs_of(paper, "--only", "table1:preresnet18_c10,fig4:cifar10,fig5,rise:resnet32_c10",
                   "--methods", "dense,loft-4-shard,loft-4", "--rise-keep", "0.1,0.5")
    pretrained = {m: {(c.pretrain.method, c.pretrain.workers, c.pretrain.data) for j, c in js
                      if j.script == "01_pretrain_loft.py"} for m, js in jobs.items()}
    assert pretrained["table1"] == {("dense", 4, "full"), ("loft", 4, "shard"), ("loft", 4, "full")}
    assert pretrained["fig4"] == pretrained["fig5"] == {("dense", 4, "full"), ("loft", 4, "full")}  # their own lists
    kept = {round(1 - c.prune.ratio, 2) for j, c in jobs["rise"] if j.script == "04_finetune.py"}
    assert kept == {0.1, 0.5}
    for bad in (["--methods", "dense,loft-3"], ["--rise-keep", "0.1,1.5"]):
        with pytest.raises(SystemExit) as e:
            paper.parse_args(["run", *bad])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert ": error: --" in err[-1] and ("loft-3" in err[-1] or "1.5" in err[-1])


def test_fig5_draws_at_the_epochs_02_marks_once_it_has_run(tmp_path):
    # before 02: the scaled epochs only; after: also the emergence and early-bird epochs it wrote
    paper = bench("paper")
    args = paper.parse_args(["run", "--data-root", "/nowhere", "--methods", "loft-4", "--only", "fig5"])
    plan = paper.Plan(args)

    def draws():
        return {j.flags[j.flags.index("--from") + 1][-6:-3] for j in paper.matrix_jobs("fig5", plan, tmp_path, [0])
                if j.script == "03_prune.py"}
    assert draws() == {"005", "010", "015", "020"}
    distance = paper.table1_run(tmp_path, "preresnet18_c10", 0, "loft-4") / "distance"
    distance.mkdir(parents=True)
    (distance / "summary.json").write_text(json.dumps({"filter_emergence_epoch": 7, "early_bird_epoch": None}))
    assert draws() == {"005", "007", "010", "015", "020"}
    (distance / "summary.json").write_text(json.dumps({"filter_emergence_epoch": 10, "early_bird_epoch": 3}))
    assert draws() == {"003", "005", "010", "015", "020"}
    assert paper.marked_epochs(distance.parent) == {10: ["filter emergence"], 3: ["early bird"]}


def test_report_writes_its_tables_between_the_pages_markers_only(tmp_path):
    paper = bench("paper")
    page = tmp_path / "results.md"
    (b1, e1), (b2, e2) = paper.markers("bench/results/paper"), paper.markers("bench/results/other")
    page.write_text(f"# Results\nbefore\n{b1}\nold table\n{e1}\nmiddle\n{b2}\nother table\n{e2}\n")
    paper.embed(page, "# Paper-scale results\n\n## Fig. 5\n\n| a |", "bench/results/paper")
    assert page.read_text() == (f"# Results\nbefore\n{b1}\n### Paper-scale results\n\n#### Fig. 5\n\n"
                                f"| a |\n{e1}\nmiddle\n{b2}\nother table\n{e2}\n")
    (tmp_path / "plain.md").write_text("# no markers\n")
    with pytest.raises(paper.UserError, match="no '<!-- begin"):
        paper.embed(tmp_path / "plain.md", "x", "bench/results/paper")
    assert (tmp_path / "plain.md").read_text() == "# no markers\n"


def test_table1_report_gives_gpipe_in_the_papers_convention_with_fwd_bwd_beside_it(tmp_path):
    # comm.json as 01 writes it for the paper's PreResNet-18 CIFAR-10 setting (S = 4, 20 epochs,
    # batch 128, K = 25): the report's analytic column must be the paper's Table 1 convention
    # (GPipe-4 659.42 G, forward activations once; LoFT-4 64.57 G), fwd+bwd beside it for GPipe
    from common.costs import analytic_bytes
    from common.models import build_model
    from common.selection import partitioned_blocks
    paper = bench("paper")
    model = build_model({"name": "preresnet18", "num_classes": 10, "width": 1.0})
    analytic = analytic_bytes(model, partitioned_blocks(model), 4, 20, 50_000, 128, 25)
    for method in ("gpipe-4", "loft-4"):
        run = paper.table1_run(tmp_path, "preresnet18_c10", 0, method)
        (run / "pretrain").mkdir(parents=True)
        (run / "pretrain/comm.json").write_text(json.dumps({"measured_payload_bytes": 1000, "analytic_ps_bytes": analytic,
                                                            "train_flops_ratio_to_dense": 0.5}))
        for tag in ("l1_p80", "l1_p50"):
            (run / f"finetune_{tag}_finetune").mkdir()
            (run / f"finetune_{tag}_finetune/result.json").write_text(json.dumps({"final_test_acc": 90.0,
                                                                                  "train_flops": 1e15}))
    text, rows = paper.table1_report(tmp_path, "preresnet18_c10", [0])
    header, _, *lines = text.splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    cells = {(c[0], c[1]): dict(zip(columns, c)) for c in ([x.strip() for x in l.strip("|").split("|")] for l in lines)}
    assert len(rows) == 4 and set(cells) == {("gpipe-4", "80 %"), ("gpipe-4", "50 %"), ("loft-4", "80 %"), ("loft-4", "50 %")}

    def giga(cell):
        number, unit = cell.split()
        return float(number) * {"GB": 1, "TB": 1e3}[unit]
    paper_col = "analytic bytes (paper's convention; GPipe fwd)"
    gpipe, loft = cells[("gpipe-4", "50 %")], cells[("loft-4", "50 %")]
    assert giga(gpipe[paper_col]) == pytest.approx(659.42, rel=0.01)
    assert giga(gpipe["GPipe analytic fwd+bwd"]) == pytest.approx(2 * giga(gpipe[paper_col]), rel=0.01)
    assert giga(loft[paper_col]) == pytest.approx(64.57, rel=0.01) and loft["GPipe analytic fwd+bwd"] == "—"
    measured = "measured bytes (LoFT/Local SGD pull+push, GPipe fwd+bwd)"
    assert (gpipe[measured], loft[measured]) == ("1.00 kB", "2.00 kB")           # LoFT: one push measured, x 2
    assert loft["pretraining FLOPs ÷ dense"] == "0.5"


def test_run_report_names_shard_equal_samples_with_the_flops_ratio_to_dense(tiny_config, tmp_path):
    import yaml
    from common.config import load_config
    report = bench("report")
    for name, data, ratio in (("full", "full", 1.59), ("shard", "shard", 0.79)):
        run = tmp_path / "runs" / name
        (run / "pretrain").mkdir(parents=True)
        cfg = load_config(tiny_config(pretrain={"data": data})).to_dict()
        (run / "pretrain/config.yaml").write_text(yaml.safe_dump(cfg))
        (run / "pretrain/comm.json").write_text(json.dumps({"train_flops_ratio_to_dense": ratio}))
    text, _ = report.report(tmp_path / "runs")
    assert "Pretraining data `shard` (equal samples, not equal FLOPs): training FLOPs 0.79× dense's." in text
    assert "Pretraining data `full` (every worker walks the whole set): training FLOPs 1.59× dense's." in text
