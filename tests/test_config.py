"""Config parsing: values YAML 1.1 reads otherwise than a user means, and what `--set` does to a
mapping the file already sets."""
from __future__ import annotations

import pytest
import yaml

from common.config import load_config
from common.errors import UserError


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
