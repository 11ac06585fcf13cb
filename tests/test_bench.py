"""The benchmarks' smoke forms run the real pipelines end to end and produce their tables."""
import importlib.util
import json

from conftest import DATA, REPO


def bench(name):
    import sys
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_table1_and_fig4_smoke(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    bench("table1").main(["--smoke", "--out", str(out), "--runs", str(runs), "--data-root", str(DATA)])
    md = (out / "table1.md").read_text()
    for method in ("dense", "gpipe-2", "gpipe-4", "localsgd-2", "localsgd-4", "loft-2", "loft-4", "loft-4-bf16"):
        assert f"| {method} |" in md
    assert "dense's tickets" not in md
    rows = json.loads((out / "table1.json").read_text())
    assert len(rows) == 8 * 2 and all(0 <= r["acc"] <= 100 and 0 <= r["acc_lossless"] <= 100 for r in rows)
    by = {r["method"]: r for r in rows}
    # GPipe-S trains as itself (BN over B/S): its own weights, not dense's
    import torch
    final = {m: torch.load(runs / f"seed0/{m}/pretrain/epoch_001.pt", weights_only=True)["model"]
             for m in ("dense", "gpipe-2", "gpipe-4")}
    key = "layer1.0.conv1.weight"
    assert not torch.equal(final["dense"][key], final["gpipe-2"][key])
    assert not torch.equal(final["gpipe-2"][key], final["gpipe-4"][key])
    assert by["gpipe-4"]["measured"] == by["gpipe-4"]["analytic"]["gpipe_fwd_bwd"]
    assert by["loft-4"]["measured"] < by["localsgd-4"]["measured"]       # LoFT sends less than Local SGD
    assert by["loft-4-bf16"]["measured"] < 0.51 * by["loft-4"]["measured"]
    assert (out / "table1.png").stat().st_size > 0
    bench("fig4").main(["--smoke", "--out", str(out), "--runs", str(runs), "--data-root", str(DATA)])
    assert (out / "fig4.png").exists() and "| loft-4 |" in (out / "fig4.md").read_text()


def test_rise_smoke(tmp_path):
    bench("rise").main(["--smoke", "--out", str(tmp_path), "--runs", str(tmp_path / "runs"), "--data-root", str(DATA)])
    md = (tmp_path / "rise.md").read_text()
    assert "| 10 % |" in md and "| 50 % |" in md and (tmp_path / "rise.png").exists()


def test_perf_prints_ratios(tmp_path):
    bench("perf").main(["--out", str(tmp_path), "--repeats", "1", "--batch", "16", "--threads", "1",
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


def test_paper_driver_stops_at_its_budget_resumes_skips_and_reports(tmp_path, capsys):
    paper = bench("paper")
    base = ["--smoke", "--only", "rise", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
            "--data-root", str(DATA)]
    assert paper.main(["run", *base, "--budget-s", "3"]) == 0          # stopped inside the first stage
    assert "budget of 3.0 s reached during rise:dense:pretrain" in capsys.readouterr().out
    assert not (tmp_path / "runs/rise/seed0/dense/pretrain/comm.json").exists()
    assert paper.main(["run", *base]) == 0                              # continues and finishes
    assert "all 10 jobs of rise done" in capsys.readouterr().out
    assert paper.main(["run", *base]) == 0                              # nothing left to do
    out = capsys.readouterr().out
    assert out.count("(done)") == 10
    assert paper.main(["report", *base]) == 0
    md = (tmp_path / "out/paper.md").read_text()
    for row in ("| 10 % | RISE-R | 1 |", "| 50 % | 1-LOT-R | 1 |", "| 100 % | full model |"):
        assert row in md, row
    assert (tmp_path / "out/rise_fig4.png").stat().st_size > 0
    assert paper.main(["run", "--only", "nope", *base[3:]]) == 2
