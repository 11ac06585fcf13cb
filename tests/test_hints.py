"""Hints that say what to do next: each names a command or setting that works in the case at hand
(no GPipe for a brought model, no --resume without last.pt, no 01 for a missing rewind epoch, the
README's interpreter name, the PYTHONPATH a brought package needs), and a failed download or a plot
leaves nothing that misleads (an empty data/, an eps line the rule does not use)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision

from common.cli import python_command, stage_command
from common.config import Config, DataCfg
from common.errors import UserError


def _args(**kw):
    return argparse.Namespace(config="yaml/x.yaml", run_dir=None, set=[], **kw)


def test_no_group_chosen_offers_gpipe_for_a_zoo_model_only():
    from common.models import build_model
    from common.selection import prunable_blocks
    tiny_cnn = Path(__file__).with_name("byom_model.py")
    brought = {"name": f"{tiny_cnn}:small_cnn", "num_classes": 10, "width": 1.0, "kwargs": {},
               "input_shape": [3, 32, 32]}   # paper preset: its groups lie in no block layerS.J
    with pytest.raises(UserError, match=r"pretrain.method=dense or localsgd and") as e:
        prunable_blocks(build_model(brought, frozenset({brought["name"]})), brought)
    assert "gpipe" not in str(e.value)
    zoo = {"name": "mobilenetv3_small", "num_classes": 10, "width": 0.25}
    with pytest.raises(UserError, match=r"pretrain.method=dense, localsgd or gpipe and"):
        prunable_blocks(build_model(zoo), zoo)


def test_a_folder_without_last_pt_is_not_told_to_resume(tmp_path):
    from common.runs import check_stage_dir
    (tmp_path / "metrics.csv").write_text("epoch\n")   # a run that stopped before its first last.pt (a full disk)
    with pytest.raises(UserError) as e:
        check_stage_dir(tmp_path, resume=False, force=False)
    assert "--resume" not in str(e.value).replace("no last.pt to resume", "") and "--force" in str(e.value)
    (tmp_path / "last.pt").write_bytes(b"")
    with pytest.raises(UserError, match="pass --resume to continue, --force to start over"):
        check_stage_dir(tmp_path, resume=False, force=False)


def test_a_missing_rewind_epoch_names_the_saved_epochs_not_01(tmp_path):
    from common.finetune import rewind_checkpoint
    (tmp_path / "epoch_000.pt").write_bytes(b"")
    (tmp_path / "epoch_002.pt").write_bytes(b"")
    ticket = SimpleNamespace(pretrain_dir=str(tmp_path), pretrain_sha256=None)   # made before hashes were recorded
    with pytest.raises(UserError, match=r"epoch_001.pt: no such pretraining checkpoint; finetune.rewind_epoch=1 must "
                                        r"be an epoch the ticket's pretraining run saved \(0, 2\)") as e:
        rewind_checkpoint(ticket, 1)
    assert "01_pretrain" not in str(e.value)


def test_hints_name_the_python_of_the_install_not_the_launchers_python3(tmp_path, monkeypatch):
    bin_ = tmp_path / "venv/bin"
    bin_.mkdir(parents=True)
    (bin_ / "python3").symlink_to(sys.executable)
    (bin_ / "python").symlink_to("python3")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "executable", str(bin_ / "python3"))   # what the DeepSpeed launcher starts
    assert python_command() == "venv/bin/python"
    (bin_ / "python").unlink()
    (bin_ / "python").symlink_to("/bin/sh")   # another program of that name
    assert python_command() == "venv/bin/python3"


def test_a_hint_for_a_brought_package_carries_pythonpath(monkeypatch):
    cfg = Config()
    monkeypatch.setenv("PYTHONPATH", "/src/my nets")
    assert stage_command("02_filter_distance.py", _args(), cfg).startswith(f"{python_command()} 02_filter")
    cfg.model.arch = "mypkg.nets:build"
    assert stage_command("02_filter_distance.py", _args(), cfg).startswith(
        f"PYTHONPATH='/src/my nets' {python_command()} 02_filter_distance.py --config yaml/x.yaml")
    cfg.model.arch = "/abs/mynet.py:build"   # a file by its path: nothing to import from PYTHONPATH
    assert "PYTHONPATH" not in stage_command("03_prune.py", _args(), cfg)
    monkeypatch.delenv("PYTHONPATH")
    cfg.model.arch = "mypkg.nets:build"
    assert "PYTHONPATH" not in stage_command("03_prune.py", _args(), cfg)


def test_a_failed_download_leaves_no_empty_data_folder(tmp_path, monkeypatch):
    from common.data import load_dataset

    class Offline:
        def __init__(self, root, train, download):
            raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    (tmp_path / "kept").mkdir()   # a folder that was there before stays
    for root in (tmp_path / "data", tmp_path / "a/b/data", tmp_path / "kept"):
        with pytest.raises(UserError, match="the download failed"):
            load_dataset(DataCfg(root=str(root)), train=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and not any((tmp_path / "kept").iterdir())


def test_the_distance_to_final_plot_draws_no_early_bird_eps_line(tmp_path, monkeypatch):
    import common.distance_plots as plots
    from common.distance_series import Series, analyse
    from common.emergence import EB_EPS
    gen = torch.Generator().manual_seed(0)
    epochs = [0, 1, 2, 3]
    series = Series(epochs, {}, "loft", {"layer2.1": torch.rand(4, 8, generator=gen)}, {"layer2.1": 72},
                    torch.rand(4, 16, generator=gen, dtype=torch.float64))
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    plots.plot_distance_to_final(epochs, analyse(series, 0.5), {"filter emergence": None, "early bird": 2},
                                 tmp_path / "d.png")
    labels = [line.get_label() for ax in figures[0].axes for line in ax.get_lines()]
    flat = [line for ax in figures[0].axes for line in ax.get_lines() if set(line.get_ydata()) == {EB_EPS}]
    assert not flat and not any("eps" in label for label in labels), labels
    assert "early bird: epoch 2" in labels
    plots._pyplot().close(figures[0])
