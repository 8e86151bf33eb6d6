"""Config loading: defaults, overrides, round trips, and one clear line for every mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from atoll.app.run_config import RunConfig, load_run_config
from atoll.cli import main
from atoll.config import ConfigError, load, save


def write(tmp_path: Path, text: str) -> Path:
    data = tmp_path / "d"
    data.mkdir(exist_ok=True)
    p = tmp_path / "run.toml"
    p.write_text(text + '\n[[sites]]\nname = "a"\ndata = "d"\n')
    return p


def test_defaults_and_overrides(tmp_path):
    cfg = load_run_config(write(tmp_path, ""), ["inner.lr=0.01", "federation.rounds=7",
                                                "baseline.kinds=['sequential']"])
    assert cfg.inner.lr == 0.01
    assert cfg.federation.rounds == 7
    assert cfg.baseline.kinds == ["sequential"]
    assert cfg.outer.lr == 0.7 and cfg.outer.momentum == 0.9 and cfg.outer.nesterov
    assert cfg.sites[0].data == str((tmp_path / "d").resolve())  # relative to the config file
    assert cfg.total_steps == 7 * cfg.federation.steps_per_round


def test_round_trip(tmp_path):
    cfg = load_run_config(write(tmp_path, "[inner]\nlr = 0.002\n"))
    save(cfg, tmp_path / "out.toml")
    again = load(RunConfig, tmp_path / "out.toml")
    assert again == cfg


@pytest.mark.parametrize("text, message", [
    ("[inner]\nlrr = 1.0", "unknown key 'inner.lrr'"),
    ("[inner]\nlr = 'fast'", "'inner.lr' must be a number"),
    ("[inner]\nlr = -1.0", "inner.lr must be positive"),
    ("[federation]\nrounds = 1.5", "'federation.rounds' must be an integer"),
    ("[model]\npreset = 'huge'", "unknown model preset 'huge'"),
    ("[baseline]\nkinds = ['magic']", "unknown baseline kind 'magic'"),
    ("[outer]\nmomentum = 0.0", "outer.nesterov needs outer.momentum > 0"),
    ("[inner\nlr = 1", "not valid TOML"),
])
def test_bad_config_names_key_and_reason(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_run_config(write(tmp_path, text))


def test_cli_reports_bad_config_in_one_line(tmp_path, capsys):
    path = write(tmp_path, "[inner]\nlrr = 1.0")
    assert main(["simulate", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run.toml" in err[0] and "inner.lrr" in err[0]
    assert not (tmp_path / "run").exists()


def test_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        load_run_config(write(tmp_path, ""), ["inner.lr"])
    with pytest.raises(ConfigError, match="unknown key 'inner.nope'"):
        load_run_config(write(tmp_path, ""), ["inner.nope=3"])


def test_missing_data_directory(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text('[[sites]]\nname = "a"\ndata = "nowhere"\n')
    with pytest.raises(ConfigError, match="nowhere of 'a' does not exist"):
        load_run_config(p)
