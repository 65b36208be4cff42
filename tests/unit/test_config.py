"""params.yaml schema: valid defaults, one-line errors naming the key, overrides."""
import pytest

from components.config import Params, apply_overrides, load_params, parse_override, validate_params
from components.errors import ParamsError
from tests.conftest import REPO


def test_repo_params_file_is_valid():
    params = load_params(REPO / "params.yaml")
    assert params.data.source == "toy2d" and params.data.name == "checkerboard"


@pytest.mark.parametrize("raw, needle", [
    ({"shard": {"val_fraction": 1.5}}, "shard.val_fraction"),
    ({"shard": {"val_fraction": 0}}, "shard.val_fraction"),
    ({"shard": {"val_fractio": 0.5}}, "unknown key 'shard.val_fractio'"),
    ({"data": {"source": "imagenet"}}, "data.source"),
    ({"data": {"n_samples": "many"}}, "data.n_samples"),
    ({"data": {"source": "cifar10"}}, "data.path is required"),
    ({"nosuchstage": {}}, "unknown key 'nosuchstage'"),
    ({"reflow": {"distill_one_step": True}}, "unknown key 'reflow.distill_one_step' (replaced by reflow.distill_nfe"),
    ({"teacher": {"processes": 2}},
     "unknown key 'teacher.processes' (replaced by distributed.processes_per_node, one setting for every training"),
    ({"dpo": {"processes": 2}}, "unknown key 'dpo.processes' (replaced by distributed.processes_per_node"),
    ({"distributed": {"processes_per_node": 4}, "progressive": {"batch_size": 258}},
     "progressive.batch_size 258 is not divisible by distributed.processes_per_node x distributed.nodes x "
     "progressive.grad_accum = 4 x 1 x 1 = 4"),
    ({"distributed": {"nodes": 0}}, "distributed.nodes"),
])
def test_bad_values_name_the_key_in_one_line(raw, needle):
    with pytest.raises(ParamsError) as e:
        validate_params(raw)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_overrides_are_parsed_as_yaml_and_validated():
    assert parse_override("shard.val_fraction=0.1") == ("shard.val_fraction", 0.1)
    assert parse_override("data.path=null") == ("data.path", None)
    # exponent floats without a dot are floats, as DVC's YAML 1.2 parser reads them (PyYAML says "2e-05")
    assert parse_override("dpo.lr=2e-05") == ("dpo.lr", 2e-05) and parse_override("x=1E3") == ("x", 1000.0)
    assert parse_override('data.name="2e-5"') == ("data.name", "2e-5")  # quoted stays a string
    raw = apply_overrides({"shard": {"val_fraction": 0.2}}, ["shard.val_fraction=0.3", "data.name=moons"])
    p = validate_params(raw)
    assert p.shard.val_fraction == 0.3 and p.data.name == "moons"
    with pytest.raises(ParamsError, match="shard.nope"):
        validate_params(apply_overrides({}, ["shard.nope=1"]))
    with pytest.raises(ParamsError, match="key.path=value"):
        parse_override("shard.val_fraction")


def test_yaml_syntax_error_is_one_line(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("shard:\n  val_fraction: [0.2\n")
    with pytest.raises(ParamsError, match="not valid YAML") as e:
        load_params(f)
    assert "\n" not in str(e.value)


def test_defaults_validate():
    assert Params().shard.min_shards >= 1


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_floats_are_params_errors(tmp_path, value):
    path = tmp_path / "params.yaml"
    path.write_text(f"teacher:\n  lr: {value}\n")
    with pytest.raises(ParamsError, match=r"teacher\.lr = .*finite number"):
        load_params(path)


def test_duplicate_keys_are_refused_at_any_level(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("teacher:\n  lr: 0.1\nshard:\n  seed: 1\nteacher:\n  steps: 3\n")
    with pytest.raises(ParamsError, match=r"duplicate key 'teacher' \(line 5; first at line 1\)"):
        load_params(path)
    path.write_text("teacher:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ParamsError, match="duplicate key 'lr'"):
        load_params(path)
