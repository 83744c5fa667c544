"""The project's contract: MLproject parameters reach the code, environments agree, config is checked."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from emnist_exp import config
from emnist_exp.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
ENTRY_MODULES = {"train": "emnist_exp.train", "main": "emnist_exp.train", "ensemble": "emnist_exp.ensemble",
                 "distill": "emnist_exp.distill"}


def mlproject() -> dict:
    return yaml.safe_load((ROOT / "MLproject").read_text())


def parser_flags(module: str) -> set[str]:
    import importlib

    parser = importlib.import_module(module).build_parser()
    return {flag for action in parser._actions for flag in action.option_strings}


@pytest.mark.parametrize("entry", sorted(mlproject()["entry_points"]))
def test_every_mlproject_parameter_reaches_the_code(entry):
    point = mlproject()["entry_points"][entry]
    command = point["command"]
    flags = parser_flags(ENTRY_MODULES[entry])
    for name in point.get("parameters", {}):
        assert re.search(rf"--{name} \{{{name}\}}", command), f"{entry}: -P {name} is not passed as --{name}"
        assert f"--{name}" in flags, f"{entry}: --{name} is not a flag of {ENTRY_MODULES[entry]}"


MLPROJECT_TYPES = {int: "int", float: "float", str: "string"}


def flag_types(module: str) -> dict[str, str]:
    """Each value-taking option of an entry point (by dest) with its MLproject type."""
    import importlib

    parser = importlib.import_module(module).build_parser()
    out = {}
    for action in parser._actions:
        if action.option_strings and action.nargs != 0:  # not --help nor a switch like --no-register
            field = config.FIELDS.get(action.dest)  # train's flags are typed by Config, argparse sees strings
            out[action.dest] = MLPROJECT_TYPES[action.type or (type(field.default) if field else str)]
    return out


@pytest.mark.parametrize("entry", ["train", "ensemble", "distill"])
def test_mlproject_parameters_and_flags_match_both_ways_with_real_types(entry):
    parameters = mlproject()["entry_points"][entry]["parameters"]
    flags = flag_types(ENTRY_MODULES[entry])
    assert set(parameters) == set(flags)
    assert {name: p["type"] for name, p in parameters.items()} == flags


def test_distill_defaults_agree_between_mlproject_the_flags_and_the_options():
    """`mlflow run . -e distill`, `python -m emnist_exp.distill` and `distillation.Options` train the same student."""
    import dataclasses

    from emnist_exp import distill, distillation

    parameters = mlproject()["entry_points"]["distill"]["parameters"]
    flags = {a.dest: a.default for a in distill.build_parser()._actions if a.option_strings and a.nargs != 0}
    options = {f.name: f.default for f in dataclasses.fields(distillation.Options)}
    for name in ("width", "epochs", "temperature", "alpha", "seed", "precision"):
        assert parameters[name]["default"] == flags[name] == options[name], name


def test_train_flags_cover_every_config_field():
    flags = parser_flags("emnist_exp.train")
    assert {f"--{name}" for name in config.FIELDS} <= flags


def locked_versions() -> dict[str, Version]:
    """requirements.lock as {canonical name: pinned version}; a line's marker (`; sys_platform == ...`) is dropped."""
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        text = line.split("#", 1)[0].split(";", 1)[0].strip()
        if text:
            requirement = Requirement(text)
            (spec,) = requirement.specifier  # one `==` pin a line, nothing else
            assert spec.operator == "==", line
            pins[canonicalize_name(requirement.name)] = Version(spec.version)
    return pins


def test_the_lock_pins_every_pyproject_dependency_within_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    pins = locked_versions()
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in requirements.lock: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject.toml's {requirement}: run `make lock`"
        for extra in requirement.extras:  # psycopg[binary] brings psycopg-binary
            assert canonicalize_name(f"{name}-{extra}") in pins, f"{requirement}: its extra is not locked"


def test_conda_env_installs_the_lock():
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())["dependencies"]
    pip = next(d["pip"] for d in conda if isinstance(d, dict))
    assert pip == ["-r requirements.lock"]
    version = Version(next(d for d in conda if isinstance(d, str) and d.startswith("python=")).split("=")[1])
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(requires).contains(version)
    assert "--python-version 3.11" in (ROOT / "Makefile").read_text() and version == Version("3.11")


def test_presets_are_valid_and_resolve(tmp_path, monkeypatch):
    monkeypatch.setenv("EMNIST_SAMPLE_DIR", str(tmp_path))  # the sample preset's folder, wherever the data is
    presets = sorted(p.stem for p in config.PRESET_DIR.glob("*.toml"))
    assert {"quick", "sample", "bymerge"} <= set(presets)
    for name in presets:
        cfg = config.resolve({"preset": name})
        assert cfg.preset == name


def test_flags_override_the_preset_and_strings_are_coerced():
    cfg = config.resolve({"preset": "quick", "epochs": "5", "seed": "3", "val_fraction": "0.2", "study": ""})
    assert (cfg.epochs, cfg.seed, cfg.val_fraction) == (5, 3, 0.2)
    assert cfg.study == config.load_preset("quick")["study"]  # '' means "not given"


@pytest.mark.parametrize("overrides, message", [
    ({"epochs": "ten"}, "epochs must be int"),
    ({"n_trials": "0"}, "n_trials must be at least 1"),
    ({"val_fraction": "0.9"}, "val_fraction must be between"),
    ({"space": "huge"}, "space must be one of"),
    ({"pruner": "sometimes"}, "pruner must be"),
    ({"preset": "nope"}, "unknown preset 'nope'"),
    ({"colour": "red"}, "unknown settings: colour"),
])
def test_bad_settings_are_one_clear_error(overrides, message):
    with pytest.raises(UserError, match=message):
        config.resolve(overrides)


def test_a_preset_with_an_unknown_key_is_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('epochs = 2\nlearning_rat = 0.1\n')
    with pytest.raises(UserError, match="unknown keys: learning_rat"):
        config.resolve({"preset": str(bad)})
    bad.write_text('epochs = "two"\n')
    with pytest.raises(UserError, match="epochs must be int"):
        config.resolve({"preset": str(bad)})


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "mnist"], "error: unknown dataset 'mnist'"),
    (["--dataset", "idx:/no/such/folder"], "error: "),
    (["--epochs", "many"], "error: epochs must be int, got 'many'."),
    (["--storage", "postgresql://u:secret@127.0.0.1:1/db"], "error: "),
])
def test_train_entry_point_answers_bad_input_with_one_line(argv, message, capsys, tmp_path, monkeypatch):
    from emnist_exp import train

    monkeypatch.chdir(tmp_path)
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert "Traceback" not in err[0] and "secret" not in err[0]
