"""Configs: one a stage cannot use is one line naming the problem, exit 2, before torch is
imported (an unreadable or non-UTF-8 file, a bad key or value, a batch larger than the data set);
values YAML 1.1 reads otherwise than a user means; what `--set` does to a mapping."""
import subprocess
import sys

import pytest
import yaml

from common.config import load_config
from common.errors import UserError
from conftest import REPO, error_lines, main_of, run_cli


# ------------------------------------------------------------ 5: unreadable configs
UNREADABLE = {
    "latin-1 bytes": (b"seed: 0\nname: caf\xe9\n", "not UTF-8"),
    "a directory": (None, "is a directory"),
    "bad YAML": (b"seed: [0\n", "not valid YAML"),
    "a list": (b"- seed\n- 0\n", "must be a mapping"),
    "binary": (bytes(range(256)), "not UTF-8"),
}

@pytest.mark.parametrize("what", list(UNREADABLE))
def test_an_unreadable_config_is_one_line_naming_the_file(tmp_path, what):
    content, message = UNREADABLE[what]
    path = tmp_path / "bad.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(UserError) as e:
        load_config(path)
    assert str(path) in str(e.value) and message in str(e.value) and "\n" not in str(e.value)

def test_a_non_utf8_config_is_one_line_exit_2_for_a_stage(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(UNREADABLE["latin-1 bytes"][0])
    r = run_cli(["01_pretrain_loft.py", "--config", str(path), "--run-dir", str(tmp_path / "r")])
    lines = error_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1 and "not UTF-8" in lines[0], r.stderr
    assert not (tmp_path / "r").exists()

# ------------------------------------------------------------ 6: a batch larger than the data set
@pytest.mark.parametrize("method, data", [("loft", "full"), ("loft", "shard"), ("localsgd", "full")])
def test_a_batch_larger_than_the_data_set_names_both_numbers(tiny_config, tmp_path, method, data):
    cfg = tiny_config(pretrain={"method": method, "data": data, "batch_size": 1000, "local_iters": 4})
    with pytest.raises(UserError) as e:
        main_of("01_pretrain_loft", cfg, tmp_path / "r")
    text = str(e.value)
    assert "batch_size" in text and "1000" in text and "640" in text, text

# ------------------------------------------------------------ 8: the config is checked before torch loads
CHECK_FIRST = """
import importlib, sys
sys.path.insert(0, {repo!r})
from common.errors import UserError
stage = importlib.import_module({script!r})
try:
    stage.main(["--config", {cfg!r}, "--run-dir", {run!r}, "--set", {setting!r}])
except UserError as e:
    print("refused:", e)
print("heavy:", sorted(m for m in ("torch", "torchvision", "deepspeed") if m in sys.modules))
"""

@pytest.mark.parametrize("setting, message", [("pretrain.epochz=3", "unknown config key 'pretrain.epochz'"),
                                              ("pretrain.workers=1", "LoFT needs at least 2 workers")])
@pytest.mark.parametrize("script", ["01_pretrain_loft", "02_filter_distance", "03_prune", "04_finetune"])
def test_a_config_error_is_refused_before_torch_is_imported(tiny_config, tmp_path, script, setting, message):
    code = CHECK_FIRST.format(repo=str(REPO), script=script, cfg=str(tiny_config()), run=str(tmp_path / "r"),
                              setting=setting)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    refusal = next((l for l in r.stdout.splitlines() if l.startswith("refused: ")), "")
    assert message in refusal, r.stdout + r.stderr
    assert "heavy: []" in r.stdout, r.stdout


# ------------------------------------------------------------ parsing: values YAML 1.1 reads otherwise than
# a user means, and what `--set` does to a mapping the file already sets
@pytest.mark.parametrize("written", ["1e-3", "1E-3", "1.0e-3", "0.001"])
def test_a_float_key_takes_an_exponent_without_a_dot(written, tmp_path):
    """PyYAML (YAML 1.1) reads 1e-3 as the string '1e-3'; a float key takes it as the number."""
    assert load_config(None, [f"pretrain.lr={written}"]).pretrain.lr == 0.001
    path = tmp_path / "c.yaml"
    path.write_text(f"pretrain:\n  lr: {written}\n  weight_decay: 5e-4\n")
    cfg = load_config(path)
    assert (cfg.pretrain.lr, cfg.pretrain.weight_decay) == (0.001, 0.0005)


@pytest.mark.parametrize("value, message", [("abc", "expected float, got str 'abc'"), (".nan", "not a finite"),
                                            ("1e999", "not a finite"), ("true", "expected float, got bool")])
def test_a_float_key_still_refuses_what_is_no_number(value, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [f"pretrain.lr={value}"])


def test_an_empty_mapping_in_set_replaces_and_a_mapping_merges(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"arch": "torchvision.resnet18",
                                              "kwargs": {"zero_init_residual": True, "width_per_group": 64}}}))
    assert load_config(path, ["model.kwargs={}"]).model.kwargs == {}
    assert load_config(path, ["model.kwargs={width_per_group: 32}"]).model.kwargs == {
        "zero_init_residual": True, "width_per_group": 32}
    assert load_config(path, ["model.kwargs.width_per_group=16"]).model.kwargs == {
        "zero_init_residual": True, "width_per_group": 16}
    assert load_config(path, ["model={}"]).model.arch == "preresnet18"   # the whole section back to its defaults
