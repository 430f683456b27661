"""Careless input (hardening issue, item 4): each refused with the field, the value and what is allowed,
before anything is built or written. Each of these was accepted, failed late, or said something misleading,
before (or is pinned here because a careless user would try it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from ramoe_ray import sources
from ramoe_ray.cli import main
from ramoe_ray.config import ConfigError, TaskConfig, config_from_dict, load_config, parse_band
from ramoe_ray.tasks import TaskDataError, load_examples, load_parallel

MGSM = Path(__file__).parents[2] / "shared/data/mgsm"


def mgsm_task(source) -> TaskConfig:
    return TaskConfig(name="mgsm", format="generative_numeric", source=str(source))

BASE = {
    "name": "t",
    "models": [{"name": "tiny", "path": "preset:olmoe", "family": "olmoe"}],
    "tasks": [{"name": "mgsm", "format": "generative_numeric", "source": str(MGSM)}],
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


# ------------------------------------------------------------------------- second part (item 4, rest)


def config_file(tmp_path, **fields) -> Path:
    """BASE (preset model, the MGSM folder, German) with its cache and runs in ``tmp_path``."""
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(dict(BASE, cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "runs"), **fields)))
    return p


def refused(tmp_path, capsys, argv) -> str:
    """``ramoe ARGV`` exits with 2 (an argparse refusal included) having written nothing; returns its stderr."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists(), "written before refusing"
    return err


def _no_hub(*args, **kwargs):
    raise AssertionError("a hub lookup for a path-like reference")


@pytest.mark.parametrize("field, value", [("tasks.0.source", "data/mgsm"), ("tasks.0.source", "./mgsm"),
                                          ("models.0.path", "modles/olmoe-1b"), ("models.0.path", "./olmoe")])
def test_a_path_typo_is_no_local_folder_without_a_hub_lookup(tmp_path, monkeypatch, capsys, field, value):
    """'data/mgsm' where a folder 'data' exists is a path (it used to become "Couldn't reach 'data/mgsm' on
    the Hub"; 'modles/olmoe-1b' "couldn't connect to huggingface.co"): refused as a missing folder."""
    import datasets

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "modles").mkdir()
    monkeypatch.setattr(datasets, "load_dataset", _no_hub)
    if field.startswith("models"):
        monkeypatch.setattr(sources, "model_hf_config", _no_hub)
    err = refused(tmp_path, capsys, ["validate", config_file(tmp_path), f"{field}={value}"])
    assert f"{field} = '{value}': no local folder '{tmp_path / Path(value)}' (does not exist" in err, err
    if field.startswith("tasks"):  # the loader applies the same rule
        with pytest.raises(TaskDataError, match=f"no local folder '{tmp_path / Path(value)}'"):
            load_examples(mgsm_task(value), "de")


@pytest.mark.parametrize("offline, reason", [(True, "not in the local HF cache (offline)"),
                                             (False, "Repository Not Found for url")])
def test_a_reference_found_nowhere_names_both_readings(tmp_path, monkeypatch, capsys, offline, reason):
    """owner/name with no local folder 'owner' may be a hub id: when the hub lacks it too, both readings."""
    import datasets
    from huggingface_hub import constants

    def missing(*args, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError("Repository Not Found for url: https://huggingface.co/x")

    def missing_model(model_cfg):
        raise OSError("Repository Not Found for url: https://huggingface.co/x\nmore detail")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(datasets, "load_dataset", missing)
    monkeypatch.setattr(sources, "model_hf_config", missing_model)
    with pytest.raises(TaskDataError) as e:
        load_examples(mgsm_task("nowhere/mgsm"), "de")
    assert f"no local folder '{tmp_path / 'nowhere/mgsm'}'; as a hub id: {reason}" in str(e.value)
    err = refused(tmp_path, capsys, ["validate", config_file(tmp_path), "models.0.path=nowhere/olmoe"])
    assert f"models.0.path = 'nowhere/olmoe': no local folder '{tmp_path / 'nowhere/olmoe'}'; as a hub id: {reason}" in err


def test_an_empty_model_folder_names_the_missing_config_json(tmp_path, capsys):
    """It used to say "Should have a model_type key in its config.json" of a folder with no config.json."""
    (tmp_path / "m").mkdir()
    err = refused(tmp_path, capsys, ["validate", config_file(tmp_path), f"models.0.path={tmp_path / 'm'}"])
    assert f"models.0.path = '{tmp_path / 'm'}': the folder '{tmp_path / 'm'}' has no config.json" in err


def _rows(n: int, change: dict | None = None) -> list[dict]:
    """n canonical generative rows; ``change``: {row index: fields to replace}."""
    return [{"id": f"q{i}", "question": f"What is {i} plus 1?", "answer": str(i + 1), **(change or {}).get(i, {})}
            for i in range(n)]


def _jsonl(rows: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_row_numbers_are_the_lines_an_editor_shows(tmp_path):
    """Row N is line N of the file (a tsv's header is line 1): pyarrow's messages counted from 0 (bad JSON
    on line 3 was "row 2"), blank jsonl lines shifted the count, and the parallel check counted examples."""
    folder = tmp_path / "t"
    folder.mkdir()
    task = TaskConfig(name="t", format="generative_numeric", source=str(folder))
    lines = _jsonl(_rows(4)).splitlines()
    (folder / "en.jsonl").write_text("\n".join(lines[:2] + ["{oops"] + lines[3:]) + "\n")
    with pytest.raises(TaskDataError, match=r"en\.jsonl: row 3: not valid JSON"):
        load_examples(task, "en")
    (folder / "en.jsonl").write_text("\n".join([lines[0], ""] + _jsonl(_rows(2, {1: {"answer": "x"}})).splitlines()[1:]))
    with pytest.raises(TaskDataError, match=r"en\.jsonl: row 3 \(id 'q1'\), field 'answer': 'x' is not a number"):
        load_examples(task, "en")
    (folder / "en.jsonl").write_text(_jsonl(_rows(3)))
    (folder / "de.tsv").write_text("id\tquestion\tanswer\nq0\tWas ist 0 plus 1?\t1\nq1\tWas ist 1 plus 1?\t3\n"
                                   "q2\tWas ist 2 plus 1?\t3\n")
    with pytest.raises(TaskDataError, match=r"de\.tsv.*row 3 \(id 'q1'\), field 'answer': '3' but English has '2'"):
        load_parallel(task, ["de"])


def test_a_mis_indented_key_is_reported_at_its_own_line(tmp_path):
    """yaml's message began with the block the fault broke ("while parsing a block mapping ... line 1"): the
    top of the file. The fault's own line comes first now, with the line itself."""
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(BASE) + "training:\n  lr: 0.001\n max_steps: 40\n")
    line = p.read_text().splitlines().index(" max_steps: 40") + 1
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"config file '{p}' is not valid YAML: line {line}, column 2: this line is indented "
                          "differently from the keys above it"), msg
    assert "\n     max_steps: 40\n     ^" in msg


GENERAL = "general.jsonl"


@pytest.mark.parametrize("argv, words", [
    (["train", "--method", "ramoe", "--lam", "-1"], "argument --lam: -1: allowed a finite number >= 0"),
    (["train", "--method", "ramoe", "--lam", "nan"], "argument --lam: nan: allowed a finite number >= 0"),
    (["train", "--method", "sft", "--workers", "-1"], "argument --workers: -1: allowed 0 or more"),
    (["train", "--method", "sft", "--top-k", "0"], "argument --top-k: 0: allowed 1 or more"),
    (["train", "--method", "sft", "--top-k", "9"], "--top-k 9: larger than the 8 experts of model 'tiny'; allowed: 1..8"),
    (["train", "--method", "sft", "--band", "0.9-0.95"], "[0.9, 0.95]: holds no MoE layer of the model"),
    (["train", "--method", "sft", "--language", "sw"], "--language 'sw' is not in the config; choose one of de"),
    (["train", "--method", "sft", "--task", "mgsn"], "--task 'mgsn' is not in the config; choose one of mgsm"),
    (["train", "--method", "sft", "--resume-from", "/no/such/checkpoint"],
     "--resume-from '/no/such/checkpoint': not a folder"),
    (["train", "--method", "sft", "tasks.0.general_source=null"], "tasks.0.general_source: not set"),
    (["train", "--method", "sft", f"tasks.0.general_source=typo-{GENERAL}"],
     f"tasks.0.general_source = 'typo-{GENERAL}': no file"),
    (["experts", "tasks.0.general_source=null"], "tasks.0.general_source: not set"),
    (["taxonomy", "--batch-size", "0"], "argument --batch-size: 0: allowed 1 or more"),
    (["evaluate", "--adapter", "/no/such/adapter"], "--adapter '/no/such/adapter': not a folder"),
    (["evaluate", "--language", "sw"], "--language ['sw']: not in the config's languages ['de']"),
    (["evaluate", "--method", "steering", "--strength", "nan"], "argument --strength: nan: allowed a finite number"),
])
def test_command_arguments_are_refused_before_anything_is_built_or_written(tmp_path, monkeypatch, capsys, argv, words):
    """`ramoe train ... --lam -1` wrote config.resolved.yaml and built the preset before refusing; --workers -1
    and taxonomy's --batch-size 0 were not refused at all."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / GENERAL).write_text(_jsonl([{"text": "Some English text."}]))
    command, *rest = argv
    err = refused(tmp_path, capsys, [command, config_file(tmp_path, tasks=[dict(BASE["tasks"][0], general_source=GENERAL)]),
                                     *rest])
    assert words in err, err


@pytest.mark.parametrize("override, words", [
    ("training.max_steps=0", "training.max_steps = 0: Input should be greater than or equal to 1"),
    ("training.lr=0", "training.lr = 0: Input should be greater than 0"),
    ("training.lrr=1", "training.lrr = 1: unknown field (check its spelling)"),
    ("training.max_steps=abc", "training.max_steps = 'abc': Input should be a valid integer"),
    ("training.epochs=1.5", "training.epochs = 1.5: Input should be a valid integer, got a number with a fractional part"),
    ("training.lr=.inf", "training.lr = inf: Input should be a finite number"),
    ("knobs.lambdas=[.nan]", "knobs.lambdas.0 = nan: Input should be a finite number"),
    ("methods=[sft, foo]", "methods.1 = 'foo': Input should be 'sft', 'steering', 'rise' or 'ramoe'"),
    ("languages=[]", "languages = []: List should have at least 1 item"),
    ("languages=[de, sw, de]", "languages = ['de', 'sw', 'de']: 'de' listed more than once; list each target language once"),
    ("languages=[en, de]", "languages = ['en', 'de']: 'en' is the source language; list only target languages"),
    ("languages=[it]", "no file for language 'it'; expected one of mgsm_it.tsv, it.jsonl, it.parquet, it.tsv "
                       "(languages in the folder: bn, de, en, es, fr, ja, ru, sw, te, th, zh)"),
    ("knobs.bands=[[0.5]]", "band 0 = [0.5] is not allowed; a band is [start, end] (fractions of depth) or 'auto'"),
    ("knobs.top_k=[0]", "knobs.top_k = [0]: top_k 0 must be >= 1"),
    ("steering.strengths=[]", "steering.strengths = []: List should have at least 1 item"),
    ("rise.budget=0", "rise.budget = 0: Input should be greater than or equal to 1"),
    ("resources.num_workers=0", "resources.num_workers = 0: Input should be greater than or equal to 1"),
    ("models.0.dtype=fp8", "models.0.dtype = 'fp8': Input should be 'float32', 'bfloat16' or 'float16'"),
    ("tasks.0.format=mcq", "tasks.0.format = 'mcq': Input should be 'generative_numeric', 'multiple_choice' or"),
    ("tasks.0.choices=numbers", "tasks.0.choices = 'numbers': Input should be 'letters' or 'texts'"),
    ("tracking.mlflow_uri=ftp://host/x", "tracking.mlflow_uri = 'ftp://host/x': not a database or server URI; "
                                         "allowed: sqlite:///PATH"),
    ("tracking.mlflow_uri=file:///tmp/mlruns", "tracking.mlflow_uri = 'file:///tmp/mlruns': not a database or server "
                                               "URI; allowed: sqlite:///PATH"),
    ("models.3.path=x", "override models.3.path: models.3: a list of 1, use an index 0..0"),
    ("name.x=1", "override name.x: name is a value, not a section"),
    ("training.lr", "override 'training.lr' is not of the form key.sub=value"),
])
def test_validate_refuses_careless_overrides_naming_field_value_and_allowed(tmp_path, capsys, override, words):
    """nan/inf, a language the task folder lacks and a tracking URI MLflow refuses used to pass validation."""
    err = refused(tmp_path, capsys, ["validate", config_file(tmp_path), override])
    assert words in err, err


@pytest.mark.parametrize("content, words", [
    (b"", "is empty"),
    (b"- name: t\n- languages: [de]\n", "the top level must be a mapping, got list"),
    (b"name: t\nmodels: caf\xe9\n", "line 2: not UTF-8 text (byte 0xe9); save it as UTF-8"),
    (None, "is a folder; give a YAML file"),
])
def test_a_config_file_that_is_not_a_yaml_mapping_is_refused(tmp_path, capsys, content, words):
    """A Latin-1 file used to end in a UnicodeDecodeError traceback; a folder was said not to exist."""
    p = tmp_path / "c.yaml"
    p.mkdir() if content is None else p.write_bytes(content)
    assert words in refused(tmp_path, capsys, ["validate", p])
    assert "does not exist" in refused(tmp_path, capsys, ["validate", tmp_path / "typo.yaml"])


@pytest.mark.parametrize("files, words", [
    ({"en.tsv": "id\tquestion\nq0\tWhat is 0 plus 1?\n"}, "en.tsv: row 2 (id 'q0'), field 'answer': missing"),
    ({"mgsm_en.tsv": "Q0?\t1\nQ1?\t\n"}, "mgsm_en.tsv: row 2 (id 'mgsm-0001'), field 'answer': missing"),
    ({"mgsm_en.tsv": "Q0?\t1\nQ1?\t2\nQ2?\t3\n", "mgsm_de.tsv": "F0?\t1\nF1?\t2\n"},
     "mgsm_de.tsv (language 'de') is not parallel to English (2 examples, English 3): missing ids (in mgsm_en.tsv "
     "but not here): mgsm-0002"),
    ({"en.jsonl": "[1, 2]\n"}, "en.jsonl: row 1: a JSON list, expected an object"),
    ({"en.jsonl": _jsonl(_rows(2)), "de.jsonl": _jsonl(_rows(2, {1: {"id": "q0"}}))},
     "de.jsonl: row 2, field 'id': 'q0' repeats row 1"),
])
def test_validate_reads_local_task_data(tmp_path, capsys, files, words):
    """`ramoe validate` did not read a local task folder: these failed only when a stage loaded the data.
    (English is read first: a fault in it needs no German file.)"""
    folder = tmp_path / "task"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    err = refused(tmp_path, capsys, ["validate", config_file(tmp_path), f"tasks.0.source={folder}"])
    assert f"tasks.0.source = '{folder}': " in err and words in err, err


def _sweep_with_one_child(tmp_path, *, folder: Path):
    """An MLflow sqlite store with a sweep parent and one FINISHED, untested child whose trial folder is ``folder``."""
    from ramoe_ray import tracking

    client = tracking.mlflow_client(f"sqlite:///{tmp_path}/mlflow.db")
    exp_id = client.create_experiment("e")
    parent = client.create_run(exp_id).info.run_id
    tags = {"mlflow.parentRunId": parent, "model": "m", "task": "arith", "language": "syn2", "method": "sft",
            "trial_index": "0", "trial_key": "m/arith/syn2/sft", "tune_trial_id": "t0", "ramoe.trial_dir": str(folder)}
    child = client.create_run(exp_id, tags=tags).info.run_id
    client.log_metric(child, "val_acc", 0.5)
    client.set_terminated(child, "FINISHED")
    return client, exp_id, parent, child


def test_a_deleted_trial_folder_is_named_before_the_test_evaluation_starts(tmp_path):
    """Selection and test on a sweep whose selected trial lost its folder (its adapter): the error names the
    folder, the trial and the MLflow run, and no Ray task starts (before: FileNotFoundError inside a Ray task)."""
    import ray

    from ramoe_ray import sweep

    gone = tmp_path / "tune" / "trials" / "p" / "gone"
    client, exp_id, parent, child = _sweep_with_one_child(tmp_path, folder=gone)
    was_up = ray.is_initialized()
    with pytest.raises(ConfigError) as e:
        sweep.select_and_test(None, client, exp_id, parent, log=print)
    msg = str(e.value)
    assert "1 of the 1 trials needed for the test evaluation" in msg
    assert str(gone) in msg and "m/arith/syn2/sft" in msg and child in msg and "Restore" in msg
    assert ray.is_initialized() == was_up
    assert client.get_run(child).data.tags["selected"] == "true"  # selection itself was done


def test_twins_of_a_trial_whose_folder_is_gone_are_refused_by_name(tmp_path):
    """A resumed sweep logs an earlier trial's twins from its trial.json: a deleted folder is named, nothing logged;
    a trial ASHA stopped needs no folder (its twins come from its MLflow child)."""
    from ramoe_ray import grid, tracking

    gone = tmp_path / "gone"
    client, exp_id, parent, child = _sweep_with_one_child(tmp_path, folder=gone)
    done = tracking.children(client, exp_id, parent)
    twin = grid.Trial(model="m", task="arith", language="syn2", method="sft", lam=0.0, band=[0.2, 1.0], top_k=1,
                      strength=None, seed=0, key="m/arith/syn2/sft#twin")
    logger = tracking.ChildLogger(client.tracking_uri, exp_id, parent, 2, 1)
    with pytest.raises(ConfigError, match=f"to log their twins.*{gone}"):
        logger.earlier_twins({"m/arith/syn2/sft": [twin]}, done)
    assert len(tracking.children(client, exp_id, parent)) == 1 and logger.twins_logged == 0
