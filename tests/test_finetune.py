"""Stage 04 on real CIFAR-10: the four initialisations, locked weights, shapes, FLOPs, resume."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from common.checkpoint import Ticket, load as load_record
from common.finetune import ticket_weights
from common.models import build_model
from conftest import pruned_lineage, run_finetune, stage

FT = {"finetune": {"epochs": 1, "batch_size": 32, "lr": 0.05, "schedule": "cosine"}}


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """01 (2 epochs) → 03 structured 50 % and magnitude keep-20 % tickets, shared by the tests."""
    return pruned_lineage(tmp_path_factory.mktemp("ft"), FT)


def finetune(cfg, run, *sets, ticket="prune_l1_p50"):
    run_finetune(cfg, run, ticket, *sets)


def load(path):
    return torch.load(path, weights_only=True)


def test_rise_locks_losers_at_their_epoch_k_values_and_moves_every_winner(lineage):
    cfg, run = lineage
    finetune(cfg, run, "finetune.mode=rise", "finetune.rewind_epoch=1", ticket="prune_mag_r20")
    final = load(run / "finetune_mag_r20_rise_k1/final.pt")
    rewound = load(run / "pretrain/epoch_001.pt")["model"]
    mask = final["mask"]
    assert mask and all(m.dtype == torch.bool for m in mask.values())
    for name, m in mask.items():
        w, w0 = final["model"][name], rewound[name]
        assert torch.equal(w[~m], w0[~m]), name             # locked: bit-identical to epoch k
        assert (w[m] != w0[m]).all(), name                  # every winner moved
    assert (~torch.cat([m.flatten() for m in mask.values()])).sum() > 0
    assert (final["model"][name] != 0).sum() > mask[name].sum()  # losers keep non-zero values (not zeroed)


def test_rewind_with_masks_holds_pruned_weights_at_zero(lineage):
    cfg, run = lineage
    finetune(cfg, run, "finetune.mode=rewind", "finetune.rewind_epoch=1", ticket="prune_mag_r20")
    final = load(run / "finetune_mag_r20_rewind_k1/final.pt")
    rewound = load(run / "pretrain/epoch_001.pt")["model"]
    for name, m in final["mask"].items():
        assert (final["model"][name][~m] == 0).all(), name
        assert not torch.equal(final["model"][name][m], rewound[name][m])


def test_scratch_differs_from_finetune_at_step_0_with_the_same_shapes(lineage):
    cfg, run = lineage
    ticket = load_record(run / "prune_l1_p50/ticket.pt", Ticket)  # its paths resolved, as 04 reads it
    tuned, fresh = ticket_weights(ticket, "finetune", 0, 0), ticket_weights(ticket, "scratch", 0, 0)
    assert {k: v.shape for k, v in tuned.items()} == {k: v.shape for k, v in fresh.items()}
    assert not torch.equal(tuned["layer2.1.conv1.weight"], fresh["layer2.1.conv1.weight"])
    rewound = ticket_weights(ticket, "rewind", 1, 0)  # epoch-1 weights cut to the kept filters
    full = load(run / "pretrain/epoch_001.pt")["model"]["layer3.1.conv1.weight"]
    assert torch.equal(rewound["layer3.1.conv1.weight"], full[ticket.kept["layer3.1"]])


def test_structured_finetune_keeps_shapes_and_counts_training_flops(lineage):
    cfg, run = lineage
    finetune(cfg, run)
    out = run / "finetune_l1_p50_finetune"
    ticket, final = load(run / "prune_l1_p50/ticket.pt"), load(out / "final.pt")
    assert final["arch"] == ticket["arch"]
    assert {k: v.shape for k, v in final["model"].items()} == {k: v.shape for k, v in ticket["model"].items()}
    # independent count: FlopCounterMode around one real training step of the ticket's model
    model = build_model(ticket["arch"]).train()
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    steps = 640 // 32
    result = json.loads((out / "result.json").read_text())
    assert result["train_flops_parts"]["finetune"] == steps * counter.get_total_flops()
    pretrain_flops = load(run / "pretrain/epoch_002.pt")["train_flops"]
    assert pretrain_flops > 0 and result["train_flops"] == pretrain_flops + steps * counter.get_total_flops()
    assert 0 <= result["final_test_acc"] <= 100 and result["params_trainable"] == result["params_total"] == ticket["params_after"]


def test_iterative_pruning_prunes_the_finetuned_ticket_again(lineage):
    cfg, run = lineage
    finetune(cfg, run, "finetune.mode=rewind", "finetune.rewind_epoch=1", ticket="prune_mag_r20")
    stage("03_prune").main(["--config", str(cfg), "--run-dir", str(run), "--set", "prune.kind=magnitude",
                            "--set", "prune.ratio=0.5", "--from", str(run / "finetune_mag_r20_rewind_k1/final.pt"),
                            "--tag", "mag_r10_it2", "--force"])
    t1, t2 = load(run / "prune_mag_r20/ticket.pt"), load(run / "prune_mag_r10_it2/ticket.pt")
    for name in t1["mask"]:
        assert not (t2["mask"][name] & ~t1["mask"][name]).any()  # a subset of the previous round's mask
    assert t2["pretrain_dir"] == t1["pretrain_dir"]


def test_resume_after_a_crash_equals_an_uninterrupted_run(lineage, monkeypatch):
    cfg, run = lineage
    common = ("finetune.epochs=3", "finetune.mode=finetune")
    finetune(cfg, run, *common, "finetune.rewind_epoch=0")
    full = load(run / "finetune_l1_p50_finetune/final.pt")["model"]
    import common.pretrain as P
    real = P.Dense.train_epoch

    def dies_in_epoch_3(self, epoch):
        if epoch == 3:
            self.train_step(self.step)
            raise KeyboardInterrupt
        return real(self, epoch)

    monkeypatch.setattr(P.Dense, "train_epoch", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        stage("04_finetune").main(["--config", str(cfg), "--run-dir", str(run), "--force", "--ticket",
                                   str(run / "prune_l1_p50/ticket.pt"), "--set", common[0], "--set", common[1]])
    monkeypatch.setattr(P.Dense, "train_epoch", real)
    stage("04_finetune").main(["--config", str(cfg), "--run-dir", str(run), "--resume", "--ticket",
                               str(run / "prune_l1_p50/ticket.pt"), "--set", common[0], "--set", common[1]])
    resumed = load(run / "finetune_l1_p50_finetune/final.pt")["model"]
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_rise_on_a_structured_ticket_and_a_missing_ticket_are_clear_errors(lineage):
    from conftest import run_cli
    cfg, run = lineage
    r = run_cli(["04_finetune.py", "--config", str(cfg), "--run-dir", str(run), "--set", "finetune.mode=rise"])
    assert r.returncode == 2 and "needs a magnitude ticket" in r.stderr
    r = run_cli(["04_finetune.py", "--config", str(cfg), "--run-dir", str(run), "--set", "prune.ratio=0.3"])
    assert r.returncode == 2 and "python 03_prune.py --config" in r.stderr


@pytest.mark.parametrize("ticket, modes", [("prune_l1_p50", ("finetune", "rewind", "scratch")),  # rise: masks only
                                           ("prune_mag_r20", ("finetune", "rewind", "scratch", "rise"))])
def test_tensorboard_train_flops_after_the_last_epoch_is_result_json_s(lineage, monkeypatch, ticket, modes):
    """One count of the training FLOPs: what 04 hands TensorBoard after its last epoch is result.json's."""
    from common.tb import Scalars
    logged = []

    class Recorded(Scalars):
        def add(self, values, step, skip=("epoch",)):
            logged.append(values)
            super().add(values, step, skip)

    monkeypatch.setattr(stage("04_finetune"), "Scalars", Recorded)
    cfg, run = lineage
    for mode in modes:
        tag = f"tb_{ticket}_{mode}"
        stage("04_finetune").main(["--config", str(cfg), "--run-dir", str(run), "--force", "--tag", tag,
                                   "--ticket", str(run / ticket / "ticket.pt"), "--set", f"finetune.mode={mode}",
                                   "--set", "finetune.rewind_epoch=1", "--set", "data.train_subset=160"])
        result = json.loads((run / f"finetune_{tag}/result.json").read_text())
        assert logged[-1]["train_flops"] == result["train_flops"] > 0, mode
