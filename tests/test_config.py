"""Config loading, overrides and validation: every bad input fails before anything is written."""

from pathlib import Path

import pytest
import yaml

from ramoe_ray import sources
from ramoe_ray.cli import main
from ramoe_ray.config import ConfigError, TaskConfig, band_layers_of, load_config, resolve_band, save_resolved
from ramoe_ray.models import build_tiny, shape_of_config, tiny_config

REPO = Path(__file__).resolve().parents[1]
MGSM = REPO.parent / "shared/data/mgsm"  # sources.check reads a local task's data

BASE = {
    "name": "t",
    "models": [{"name": "tiny", "path": "preset:olmoe", "family": "olmoe"}],
    "tasks": [{"name": "mgsm", "format": "generative_numeric", "source": str(MGSM)}],
    "languages": ["de", "sw"],
    "knobs": {"lambdas": [0.0, 0.5], "bands": [[0.25, 0.75], "auto"], "top_k": [1, 2]},
}


def write(tmp_path, data, name="c.yaml"):
    data = dict(data, output_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"))
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_valid_config_with_overrides(tmp_path):
    cfg = load_config(
        write(tmp_path, BASE),
        ["training.lr=1e-4", "models.0.dtype=bfloat16", "knobs.lambdas=[0, 1.5]", "knobs.bands=[[0.5, 1.0]]"],
    )
    assert cfg.training.lr == 1e-4 and cfg.models[0].dtype == "bfloat16"
    assert cfg.knobs.lambdas == [0.0, 1.5]
    assert cfg.knobs.bands[0].start == 0.5 and cfg.knobs.bands[0].end == 1.0
    assert cfg.models[0].trust_remote_code is False
    assert cfg.mlflow_uri.startswith("sqlite:///") and cfg.mlflow_uri.endswith("runs/t/mlflow.db")
    shapes = sources.check(cfg)
    assert shapes["tiny"].num_experts == 8 and shapes["tiny"].moe_layers == (0, 1, 2, 3)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["training.seeds=[7, 8]"])
    out = save_resolved(cfg, cfg.run_dir)
    assert out.parent == Path(cfg.run_dir)
    assert load_config(out) == cfg


@pytest.mark.parametrize(
    "override, field, value, allowed",
    [
        ("models.0.family=llama", "models.0.family", "'llama'", "supported families: olmoe, qwen3_moe, mixtral"),
        ("knobs.bands=[[0.5, 1.2]]", "knobs.bands", "[0.5, 1.2]", "outside 0-1"),
        ("knobs.bands=[[0.6, 0.4]]", "knobs.bands", "[0.6, 0.4]", "reversed (start > end); write [0.4, 0.6]"),
        ("knobs.bands=[[0.5, 0.5]]", "knobs.bands", "[0.5, 0.5]", "empty; start must be smaller than end"),
        ("knobs.bands=[middle]", "knobs.bands", "'middle'", "[start, end] (fractions of depth) or 'auto'"),
        ("knobs.top_k=[2, 16]", "knobs.top_k.1", "16", "allowed: 1..8"),
        ("knobs.bands=[[0.9, 0.95]]", "knobs.bands.0", "[0.9, 0.95]", "holds no MoE layer"),
        ("methods=[sft, dpo]", "methods.1", "'dpo'", "'sft', 'steering', 'rise' or 'ramoe'"),
        ("languages=[de, xx]", "languages", "'xx'", "allowed: am, ar, bn"),
        ("knobs.lambdas=[0.1, -1]", "knobs.lambdas", "-1", "must be >= 0"),
        ("knobs.lambdas=[]", "knobs.lambdas", "[]", "at least 1 item"),
        ("models.0.path=preset:llama", "models.0.path", "'preset:llama'", "presets: preset:olmoe"),
        ("trainig.lr=1", "trainig", "", "unknown field"),
        ("training.lr=-0.1", "training.lr", "-0.1", "greater than 0"),
        ("sweep.storage_path=s3://bucket/ramoe", "sweep.storage_path", "'s3://bucket/ramoe'", "not an object store"),
    ],
)
def test_invalid_config_names_field_value_and_allowed_and_writes_nothing(tmp_path, capsys, override, field, value, allowed):
    path = write(tmp_path, BASE)
    assert main(["demo", str(path), override]) == 2
    err = capsys.readouterr().err
    assert field in err and value in err and allowed in err, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_malformed_yaml_and_missing_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodels: [\n  - oops: {\n")
    assert main(["validate", str(bad)]) == 2
    assert "is not valid YAML" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(write(tmp_path, BASE), ["training.lr"])
    with pytest.raises(ConfigError, match="models.name: a list of 1, use an index 0..0"):
        load_config(write(tmp_path, BASE), ["models.name=x"])


def test_top_k_checked_against_a_local_model_folder(tmp_path):
    build_tiny("mixtral", num_local_experts=4).save_pretrained(tmp_path / "mix4")
    data = dict(BASE, models=[{"name": "m", "path": str(tmp_path / "mix4"), "family": "mixtral"}])
    cfg = load_config(write(tmp_path, data), ["knobs.top_k=[4]"])
    assert sources.check(cfg)["m"].num_experts == 4
    cfg = load_config(write(tmp_path, data), ["knobs.top_k=[5]"])
    with pytest.raises(ConfigError, match=r"knobs.top_k.0 = 5: larger than the 4 experts of model 'm'; allowed: 1..4"):
        sources.check(cfg)


def test_band_rule():
    # centre (l + 0.5) / L in [start, end): 16 layers, middle quarter -> layers 6..9
    assert band_layers_of(0.375, 0.625, range(16), 16) == [6, 7, 8, 9]
    assert band_layers_of(0.375, 0.625, range(4), 4) == [1]
    assert band_layers_of(0.5, 1.0, range(4), 4) == [2, 3]
    assert band_layers_of(0.0, 1.0, [1, 2, 3], 4) == [1, 2, 3]  # dense layer 0 never returned
    assert band_layers_of(0.9, 0.95, range(4), 4) == []


@pytest.mark.parametrize("family, dense", [("qwen3_moe", dict(mlp_only_layers=[3])),
                                           ("deepseek_v2", dict(first_k_dense_replace=1))])
def test_validation_and_training_agree_on_a_band_of_a_model_with_dense_layers(tmp_path, family, dense):
    """One band type: ``ramoe validate`` (sources.check) refuses exactly the bands training refuses, counting
    the model's own layers, dense ones included (validation used to count last MoE layer + 1)."""
    build_tiny(family, **dense).save_pretrained(tmp_path / "m")
    shape = shape_of_config(tiny_config(family, **dense))
    data = dict(BASE, models=[{"name": "m", "path": str(tmp_path / "m"), "family": family}])
    for start, end in [(0.75, 1.0), (0.0, 0.25), (0.5, 1.0), (0.25, 0.75)]:
        cfg = load_config(write(tmp_path, data), [f"knobs.bands=[[{start}, {end}]]", "knobs.top_k=[1]"])
        band = cfg.knobs.bands[0]
        try:
            trained = resolve_band(band, shape)  # what training and stage 2 use
        except ConfigError:
            trained = None
        if trained is None:
            with pytest.raises(ConfigError, match="holds no MoE layer"):
                sources.check(cfg)
        else:
            assert sources.check(cfg)["m"] == shape
            assert band.layers(shape.moe_layers, shape.num_layers) == trained
    # the case that used to disagree: qwen3 with its last layer dense, band [0.75, 1.0]
    if family == "qwen3_moe":
        assert band_layers_of(0.75, 1.0, shape.moe_layers, max(shape.moe_layers) + 1) == [2]  # the old count
        assert band_layers_of(0.75, 1.0, shape.moe_layers, shape.num_layers) == []


def test_shipped_sweep_configs_are_valid():
    configs = sorted((REPO / "sweeps").glob("*.yaml"))
    assert configs, "no sweep configs shipped"
    for path in configs:
        cfg = load_config(path)
        if all(m.path.startswith("preset:") for m in cfg.models):
            sources.check(cfg)


def test_choices_mode_defaults_to_letters_and_to_texts_for_the_synthetic_world(cache_dir):
    assert TaskConfig(name="m", format="multiple_choice", source="x/y").choices == "letters"
    world = TaskConfig(name="c", format="multiple_choice", source="synthetic-small:category")
    assert world.choices == "letters"  # the config knows no world; resolving the reference sets the world's mode
    assert sources.resolve_task(0, world, Path.cwd(), str(cache_dir)).choices == "texts"
    explicit = TaskConfig(name="c", format="multiple_choice", source="synthetic-small:category", choices="letters")
    assert sources.resolve_task(0, explicit, Path.cwd(), str(cache_dir)).choices == "letters"


@pytest.mark.parametrize("command", ["sweep", "validate", "taxonomy", "experts", "train", "evaluate", "report"])
def test_overrides_without_a_config_name_the_command(command, capsys):
    """Only `ramoe demo` has a config of its own; elsewhere an override in the config's place is an error
    (it used to run the demo config silently)."""
    with pytest.raises(SystemExit) as e:
        main([command, "training.lr=1e-4", *(["--method", "sft"] if command == "train" else [])])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{command}: 'training.lr=1e-4' is an override, not a config file" in err and f"ramoe {command} CONFIG" in err


def test_demo_takes_overrides_without_a_config(tmp_path, capsys):
    """`ramoe demo key=value` applies the override to sweeps/demo.yaml (here one that fails validation)."""
    assert main(["demo", "knobs.lambdas=[-1]"]) == 2
    assert "knobs.lambdas" in capsys.readouterr().err
