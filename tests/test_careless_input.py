"""Careless input (hardening issue, item 4, first part): each refused with the field, the value and what is
allowed, before anything is built or written. Each of these was accepted, or failed late, before."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from ramoe_ray import sources
from ramoe_ray.cli import main
from ramoe_ray.config import ConfigError, TaskConfig, config_from_dict, load_config, parse_band
from ramoe_ray.tasks import load_examples, load_parallel

MGSM = Path(__file__).parents[2] / "shared/data/mgsm"


def mgsm_task(source) -> TaskConfig:
    return TaskConfig(name="mgsm", format="generative_numeric", source=str(source))

BASE = {
    "name": "t",
    "models": [{"name": "tiny", "path": "preset:olmoe", "family": "olmoe"}],
    "tasks": [{"name": "mgsm", "format": "generative_numeric", "source": "somewhere"}],
    "languages": ["de"],
}


def test_a_duplicate_key_is_refused_naming_the_key_and_both_lines(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(BASE) + "training:\n  max_steps: 40\n  lora_rank: 4\ntraining:\n  lr: 0.001\n")
    first = p.read_text().splitlines().index("training:") + 1
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert f"duplicate key 'training' on line {first + 3} (first on line {first})" in msg and str(p) in msg
    nested = tmp_path / "n.yaml"
    nested.write_text(yaml.safe_dump(BASE) + "training:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match="duplicate key 'lr'"):
        load_config(nested)


@pytest.mark.parametrize("value", ["yes", "on", "1", "t", "true", 1])
def test_trust_remote_code_takes_real_booleans_only(value):
    bad = dict(BASE, models=[dict(BASE["models"][0], trust_remote_code=value)])
    with pytest.raises(ConfigError, match="models.0.trust_remote_code"):
        config_from_dict(bad)
    good = dict(BASE, models=[dict(BASE["models"][0], trust_remote_code=True)])
    assert config_from_dict(good).models[0].trust_remote_code is True


@pytest.mark.parametrize("field, value", [("name", "../../escape"), ("name", "a/b"), ("name", ".hidden"),
                                          ("models.0.name", "../m"), ("tasks.0.name", "x/y")])
def test_names_are_one_safe_path_component(field, value):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    node, *path = field.split(".")
    if path:
        data[node][int(path[0])][path[1]] = value
    else:
        data[node] = value
    with pytest.raises(ConfigError, match=f"{field} = '{value}'.*one path component"):
        config_from_dict(data)


@pytest.mark.parametrize("field", ["cache_dir", "output_dir"])
def test_a_folder_field_pointing_at_a_file_is_refused_by_validate(tmp_path, capsys, field):
    (tmp_path / "afile").write_text("x")
    cfg = dict(BASE, cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "runs"))
    for value, words in ((tmp_path / "afile", "is a file"), (tmp_path / "afile" / "sub", "lies under the file")):
        p = tmp_path / "c.yaml"
        p.write_text(yaml.safe_dump(dict(cfg, **{field: str(value)})))
        assert main(["validate", str(p)]) == 2
        err = capsys.readouterr().err
        assert f"{field} = '{value}': {words}" in err, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()


def test_a_reversed_band_says_it_is_reversed(capsys, tmp_path):
    with pytest.raises(ValueError, match=r"--band = \[0.6, 0.4\] is reversed \(start > end\); write \[0.4, 0.6\]"):
        parse_band("0.6-0.4", "--band")
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(dict(BASE, cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "runs"))))
    assert main(["train", str(p), "--method", "sft", "--band", "0.6-0.4"]) == 2
    assert "reversed" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path):
    for lang in ("en", "de"):
        shutil.copy(MGSM / f"mgsm_{lang}.tsv", tmp_path / f"mgsm_{lang}.tsv")
    de = tmp_path / "mgsm_de.tsv"
    de.write_bytes(b"\xef\xbb\xbf" + de.read_bytes())
    plain = load_examples(mgsm_task(MGSM), "de")
    assert load_examples(mgsm_task(tmp_path), "de") == plain  # the first question has no U+FEFF
    # a header tsv: with the mark, its first column used to be '\ufeffid', so every id was "missing"
    header = tmp_path / "h"
    header.mkdir()
    for lang in ("en", "de"):
        rows = load_examples(mgsm_task(MGSM), lang)[:5]
        text = "id\tquestion\tanswer\n" + "".join(f"{r['id']}\t{r['question']}\t{r['answer']}\n" for r in rows)
        (header / f"{lang}.tsv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    data = load_parallel(mgsm_task(header), ["de"])
    assert [r["id"] for r in data["de"]] == [r["id"] for r in plain[:5]]


def test_sources_check_is_what_validate_runs(tmp_path):
    """The folder checks run in sources.check (validate, and every run through sources.resolve)."""
    (tmp_path / "afile").write_text("x")
    cfg = config_from_dict(dict(BASE, cache_dir=str(tmp_path / "afile")))
    with pytest.raises(ConfigError, match="cache_dir"):
        sources.check(cfg)
    with pytest.raises(ConfigError, match="cache_dir"):
        sources.resolve(cfg)
    assert Path(tmp_path / "afile").read_text() == "x"


def test_a_sweep_checks_everything_before_building_the_world(tmp_path):
    """A bad tracking URI is refused before sources.build would pretrain the synthetic world (minutes)."""
    from ramoe_ray import sweep

    cfg = config_from_dict(dict(
        models=[dict(name="m", family="olmoe", path="synthetic-small:olmoe")],
        tasks=[dict(name="a", format="generative_numeric", source="synthetic-small:arith")], languages=["syn3"],
        cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "runs"),
        tracking=dict(mlflow_uri=f"file://{tmp_path / 'mlruns'}")))
    with pytest.raises(ConfigError, match="tracking.mlflow_uri"):
        sweep.run_sweep(cfg)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()
