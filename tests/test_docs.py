"""The README and docs/ say what the files are: its YAML blocks are valid configs, the config it
shows as a file's is that file, its model example runs, and every config and figure is listed."""
from __future__ import annotations

import ast
import re

import pytest

from conftest import REPO, stage
from common.config import load_config

README = (REPO / "README.md").read_text()


def blocks(text: str, lang: str) -> list[str]:
    """The bodies of the ```LANG fenced blocks of a Markdown text."""
    return re.findall(rf"^```{lang}\n(.*?)^```$", text, re.S | re.M)


def named_blocks(text: str) -> dict[str, str]:
    """The blocks whose first line is `# FILE` (the README's own-model example), by file name."""
    return {m.group(1): body for body in blocks(text, "(?:python|yaml)")
            if (m := re.match(r"# (\S+\.(?:py|yaml))\n", body))}


def test_every_yaml_block_of_the_readme_is_a_valid_config(tmp_path):
    for name, body in named_blocks(README).items():   # what a block's config names beside it
        (tmp_path / name).write_text(body)
    found = blocks(README, "yaml")
    assert len(found) >= 2
    for i, body in enumerate(found):
        path = tmp_path / f"block{i}.yaml"
        path.write_text(body)
        load_config(path)


def test_the_readme_config_of_a_file_is_that_file():
    """The README's ResNet-50 block is yaml/resnet50_c10.yaml below the file's header comment."""
    shown = next(b for b in blocks(README, "yaml") if "torchvision.resnet50" in b)
    name = re.search(r"The complete config\s+`(yaml/\S+\.yaml)`", README).group(1)
    lines = (REPO / name).read_text().splitlines(keepends=True)
    while lines[0].startswith("#"):
        lines.pop(0)
    assert shown == "".join(lines)


def test_the_readme_own_model_example_runs(tmp_path, capsys):
    """Ten lines of Python and the YAML naming them by file path: 01 --dry-run finds its groups."""
    files = named_blocks(README)
    assert set(files) == {"mynet.py", "mynet.yaml"} and len(files["mynet.py"].splitlines()) <= 11
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    stage("01_pretrain_loft").main(["--config", str(tmp_path / "mynet.yaml"), "--dry-run"])
    out, err = capsys.readouterr()
    assert '"params_total"' in out and "2 channel groups" in err


def test_every_config_in_yaml_is_listed_in_docs_models():
    listed = set(re.findall(r"`(\w+)`", (REPO / "docs/models.md").read_text().split("## Configs", 1)[1]))
    assert {p.stem for p in (REPO / "yaml").glob("*.yaml")} <= listed


def test_every_figure_under_docs_img_is_shown_on_a_page():
    pages = README + "".join(p.read_text() for p in (REPO / "docs").glob("*.md"))
    for image in (REPO / "docs/img").iterdir():
        assert f"img/{image.name})" in pages, image.name


@pytest.mark.parametrize("script", ["01_pretrain_loft.py", "02_filter_distance.py", "03_prune.py",
                                    "04_finetune.py"])
def test_the_readme_table_names_every_file_a_stage_writes(script):
    """The files a stage's docstring says it writes (but config.yaml, which the table says every stage
    folder holds) are in its row of README "What each stage writes" (04's last.pt was not)."""
    doc = ast.get_docstring(ast.parse((REPO / script).read_text()))
    writes = doc[re.search(r"[Ww]rites\s", doc).start():]
    row = next(line for line in README.splitlines() if line.startswith(f"| `{script}` |"))
    files = set(re.findall(r"\b\w+\.(?:pt|csv|json|png)\b", writes))
    assert files and all(f in row for f in files), sorted(f for f in files if f not in row)
