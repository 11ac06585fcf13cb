"""Learning-rate schedules (common/schedule.py) against hand values, and their config checks."""
import math

import pytest

from common.config import load_config
from common.errors import UserError
from common.schedule import Schedule, schedule_of
from conftest import REPO, run_cli


def test_resnet32_multistep_divides_by_10_after_epochs_80_and_120():
    cfg = load_config(REPO / "yaml/resnet32_c10.yaml")
    sched = schedule_of(cfg.pretrain, steps_per_epoch=50_000 // 100)   # 500 steps an epoch
    hand = {0: 0.1, 39_999: 0.1, 40_000: 0.01, 59_999: 0.01, 60_000: 0.001, 89_999: 0.001}
    for step, lr in hand.items():
        assert sched.lr(step) == pytest.approx(lr, rel=1e-12), step


def test_mobilenet_warms_up_linearly_for_5_epochs_then_cosine_from_035():
    cfg = load_config(REPO / "yaml/mobilenetv3_small_c10.yaml")
    sched = schedule_of(cfg.pretrain, steps_per_epoch=50_000 // 128)   # 390 steps; warm-up = 1950 steps
    assert sched.lr(0) == pytest.approx(0.35 / 1950)
    assert sched.lr(974) == pytest.approx(0.175)            # (974 + 1) / 1950 of the way
    assert sched.lr(1949) == pytest.approx(0.35)
    assert sched.lr(1950) == pytest.approx(0.35)             # cosine starts at its peak
    assert sched.lr(1950 + 37_050 // 2) == pytest.approx(0.175)  # half way down the 37,050 cosine steps
    assert sched.lr(38_999) == pytest.approx(0.35 * 0.5 * (1 + math.cos(math.pi * 37_049 / 37_050)))
    assert sched.lr(38_999) < 1e-6


def test_resnet18_imagenet_milestones_30_60_at_batch_1024():
    cfg = load_config(REPO / "yaml/resnet18_in.yaml")
    steps = 1_281_167 // 1024                                    # 1251
    sched = schedule_of(cfg.pretrain, steps)
    assert [sched.lr(s) for s in (30 * steps - 1, 30 * steps, 60 * steps)] == pytest.approx([0.1, 0.01, 0.001])


def test_step_and_cosine_keep_their_old_values():
    step = Schedule(0.1, "step", total_steps=100)
    assert [step.lr(t) for t in (49, 50, 74, 75)] == pytest.approx([0.1, 0.01, 0.01, 0.001])
    cos = Schedule(0.1, "cosine", total_steps=100)
    assert cos.lr(0) == 0.1 and cos.lr(50) == pytest.approx(0.05) and cos.lr(25) == 0.1 * 0.5 * (1 + math.cos(math.pi * 25 / 100))


def test_milestones_in_rounds_are_K_steps_each():
    cfg = load_config(None, ["pretrain.schedule=multistep", "pretrain.milestone_unit=rounds",
                             "pretrain.milestones=[2, 3]", "pretrain.local_iters=5", "pretrain.gamma=0.5",
                             "pretrain.lr=0.2"])
    sched = schedule_of(cfg.pretrain, steps_per_epoch=20, local_iters=cfg.pretrain.local_iters)
    assert [sched.lr(t) for t in (9, 10, 14, 15)] == pytest.approx([0.2, 0.1, 0.1, 0.05])


def test_paper_loft_configs_follow_the_authors_round_schedule_which_never_fires_in_20_epochs():
    # authors' code: ÷10 after 3800/7600/11400 rounds; CIFAR-10 at batch 128, K = 25: 312 rounds
    cfg = load_config(REPO / "yaml/preresnet18_c10.yaml")
    pc = cfg.pretrain
    assert (pc.schedule, pc.milestone_unit, pc.milestones) == ("multistep", "rounds", [3800, 7600, 11400])
    steps = 50_000 // 128
    sched = schedule_of(pc, steps, pc.local_iters)
    assert sched.lr(pc.epochs * steps - 1) == 0.1               # the last step of round 312
    assert sched.lr(3800 * 25 - 1) == 0.1 and sched.lr(3800 * 25) == pytest.approx(0.01)


def test_a_rewound_ticket_continues_the_schedule_at_epoch_k():
    sched = Schedule(0.1, "multistep", total_steps=180 * 500, milestones=(80 * 500, 120 * 500))
    same_batch = sched.continued(epoch=79, own_steps_per_epoch=500, trainer_steps_per_epoch=500)
    for t in (0, 499, 500, 40_000):
        assert same_batch.lr(t) == sched.lr(79 * 500 + t)
    assert same_batch.lr(499) == 0.1 and same_batch.lr(500) == pytest.approx(0.01)   # epoch 80 ends at t = 499
    half_batch = sched.continued(epoch=79, own_steps_per_epoch=500, trainer_steps_per_epoch=1000)
    assert half_batch.lr(999) == 0.1 and half_batch.lr(1000) == pytest.approx(0.01)  # same epoch, twice the steps


@pytest.mark.parametrize("sets, message", [
    (["pretrain.schedule=multistep"], "needs at least one milestone"),
    (["pretrain.schedule=multistep", "pretrain.milestones=[5, 3]"], "strictly increasing"),
    (["finetune.milestones=[3]"], "only used by schedule multistep"),
    (["pretrain.milestones=[1, x]", "pretrain.schedule=multistep"], "pretrain.milestones[1]: expected int"),
    (["pretrain.warmup_epochs=20", "pretrain.epochs=20"], "must be shorter"),
    (["finetune.mode=rise", "finetune.rewind_epoch=5", "pretrain.epochs=20", "finetune.epochs=16"],
     "runs past the end of the pretraining schedule (15 epochs remain"),
    (["finetune.mode=rewind", "finetune.rewind_epoch=20", "pretrain.epochs=20"], "leaves no epoch"),
    (["finetune.epochs=0"], "needs finetune.schedule_from rewind"),
])
def test_bad_schedule_keys_are_one_line_errors(sets, message):
    with pytest.raises(UserError, match=None) as e:
        load_config(None, sets)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_schedule_key_on_the_command_line_exits_2(tiny_config):
    r = run_cli(["01_pretrain_loft.py", "--config", str(tiny_config()), "--set", "pretrain.schedule=multistep"])
    assert r.returncode == 2 and "pretrain.milestones" in r.stderr and len(r.stderr.strip().splitlines()) == 1


TABLE1_CONFIGS = ("preresnet18_c10", "preresnet34_c10", "r34_c10", "preresnet18_c100", "preresnet34_c100", "r34_c100",
                  "preresnet18_in")


@pytest.mark.parametrize("name", TABLE1_CONFIGS)
def test_paper_configs_fine_tune_on_the_authors_finetune_py_schedule(name):
    # dunchen/LOFT_release finetune.py, adjust_learning_rate(optimizer, epoch) with a 0-based epoch
    def release_lr(epoch):
        return 0.1 / 10 ** ((epoch > 30) + (epoch > 60) + (epoch > 80))
    fc = load_config(REPO / f"yaml/{name}.yaml").finetune
    assert fc.epochs == 90 and fc.lr == 0.1
    steps = 50_000 // fc.batch_size
    sched = schedule_of(fc, steps)
    for epoch in range(90):
        for step in (epoch * steps, epoch * steps + steps - 1):   # the first and last step of each epoch
            assert sched.lr(step) == pytest.approx(release_lr(epoch), rel=1e-12), (epoch, step)


def test_the_default_fine_tune_schedule_stays_relative_to_its_length():
    fc = load_config(None, ["finetune.epochs=8"]).finetune
    sched = schedule_of(fc, steps_per_epoch=10)                   # ÷10 after 50 % and 75 % of 80 steps
    assert [sched.lr(t) for t in (39, 40, 59, 60, 79)] == pytest.approx([0.1, 0.01, 0.01, 0.001, 0.001])
