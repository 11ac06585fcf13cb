"""Every ablation hook of README "Where to edit for an ablation" is one function: replacing just
that function changes a real LoFT pretraining run (and the combine rule leaves Local SGD alone:
tests/test_loft.py)."""

import pytest
import torch

import common.data as D
import common.pretrain as P
import common.schedule as SCH
import common.train as T
from conftest import stage


def dealt_in_order(blocks, workers, seed, round_):
    """A partition scheme that is not random: channels dealt out in order."""
    return {b.name: [torch.arange(b.mid)[w::workers] for w in range(workers)] for b in blocks}


def hooks(monkeypatch):
    """name → a function that installs the variant (each the one-function edit the README names)."""
    return {
        "partition scheme (common.loft.draw_partition)":
            lambda: monkeypatch.setattr(P, "draw_partition", dealt_in_order),
        "LoFT combine rule (Loft.combine)":
            lambda: monkeypatch.setattr(P.Loft, "combine", staticmethod(lambda st: st.median(0).values)),
        "BN recalibration (common.train.recalibrate_bn)":
            lambda: monkeypatch.setattr(T, "recalibrate_bn", lambda model, *a, **k: model),
        "augmentation (common.data.apply_augment)":
            lambda: monkeypatch.setattr(D, "apply_augment", lambda images, dy, dx, flip, pad=4: images),
        "schedule (Schedule.lr)":
            lambda: monkeypatch.setattr(SCH.Schedule, "lr", lambda self, step: self.base_lr * 0.5),
        "loss (common.train.criterion)":
            lambda: monkeypatch.setattr(T, "criterion", lambda logits, y: torch.nn.functional.cross_entropy(
                logits, y, label_smoothing=0.1)),
    }


@pytest.fixture(scope="module")
def baseline():
    """The unedited run, made once by the first test that needs it."""
    return {}


def pretrained(tiny_config, path, name):
    cfg = tiny_config(name=name, pretrain={"epochs": 1})
    stage("01_pretrain_loft").main(["--config", str(cfg), "--run-dir", str(path / name)])
    return torch.load(path / name / "pretrain/epoch_001.pt", weights_only=True)["model"]


@pytest.mark.parametrize("hook", list(hooks(None)))
def test_each_ablation_hook_is_one_function_that_changes_the_run(hook, tiny_config, tmp_path, monkeypatch, baseline):
    if "ref" not in baseline:
        baseline["ref"] = pretrained(tiny_config, tmp_path, "ref")
    hooks(monkeypatch)[hook]()
    changed = pretrained(tiny_config, tmp_path, "variant")
    assert any(not torch.equal(changed[k], baseline["ref"][k]) for k in changed), hook
