from pathlib import Path

import pytest

from tmtseg.config import config_from_dict, diff, load_config, to_dict
from tmtseg.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "tmtseg" / "configs").glob("*.yaml"))


def test_defaults_yaml_and_overrides_merge(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("data:\n  batch_size: 3\nmodel:\n  num_queries: 7\n")
    cfg = load_config([str(f)], ["model.num_queries=9", "adapt.acte.kappa=5"])
    assert cfg.data.batch_size == 3 and cfg.model.num_queries == 9 and cfg.adapt.acte.kappa == 5.0
    assert cfg.train.iters == load_config().train.iters


def test_a_files_interpolation_is_resolved_before_the_overrides_and_loads_share_nothing(tmp_path):
    """A file's ${...} takes the value the files give; an override of the key it points to does not move it (the
    overrides set plain values over the merged files). The defaults are built once per process: no load may change
    another's."""
    f = tmp_path / "a.yaml"
    f.write_text("train:\n  iters: 30\n  eval_every: ${train.iters}\n")
    cfg = load_config([str(f)], ["train.iters=8"])
    assert (cfg.train.iters, cfg.train.eval_every) == (8, 30)
    assert load_config([str(f)]).train.eval_every == 30
    cfg.model.num_queries += 1  # a config is the caller's own object
    (tmp_path / "b.yaml").write_text("train:\n  nope: 1\n")
    with pytest.raises(ConfigError, match=r"b\.yaml.*train\.nope"):
        load_config([str(tmp_path / "b.yaml")])
    assert load_config() == load_config([], []) and load_config().model.num_queries != cfg.model.num_queries
    assert load_config().train.eval_every != 30


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.bogus=1", "data.bogus"),
        ("model.num_queries=abc", "model.num_queries"),
        ("adapt.method=x", "adapt.method"),
        ("model.nheads=3", "model.nheads"),
        ("adapt.tma.alpha=2", "adapt.tma.alpha"),
        ("train.compile=maybe", "train.compile"),
        ("train.compile_backend=fast", "train.compile_backend"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config([], [override])


def test_unknown_key_in_a_file_names_file_and_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  itres: 5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*train\.itres"):
        load_config([str(f)])


def test_round_trip_and_diff():
    cfg = load_config([], ["train.lr=0.5"])
    again = config_from_dict(to_dict(cfg))
    assert again == cfg
    assert diff(cfg, load_config()) == [f"train.lr: 0.5 -> {load_config().train.lr!r}"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    files = [str(path)] if path.name != "camvid_dusk.yaml" else [str(path.with_name("camvid.yaml")), str(path)]
    cfg = load_config(files)
    assert cfg.name
