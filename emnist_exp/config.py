"""The run configuration: defaults, preset files in experiments/, and checked overrides."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emnist_exp.errors import UserError
from emnist_exp.precision import PRECISIONS

PRESET_DIR = Path(__file__).resolve().parent.parent / "experiments"
# `${NAME}` or `${NAME:-fallback}` in a preset's string, filled in from the environment when the preset
# loads: a folder that differs between machines is set there, not by editing the preset. The shell's
# rule: the fallback applies when NAME is unset or empty.
VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")
# A study names its MLflow experiment, its runs (the longest, `ensemble-<study> weighted x100`, within
# MLflow's 250 characters for a run name) and its artifact folder (a file name: 255 bytes on Linux).
MAX_STUDY_BYTES = 200


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything one worker of a study needs. Defaults are the full-data job."""

    # data
    dataset: str = "emnist/bymerge"  # emnist/<config>, idx:<folder>, synthetic[:N]
    max_examples: int = 0  # cap on train examples (validation included); 0 = all
    val_fraction: float = 0.1  # carved from the end of train, never from test
    data_dir: str = ""  # tfds data dir; "" = tfds's own default (TFDS_DATA_DIR or ~/tensorflow_datasets)
    # study
    study: str = "emnist"
    n_trials: int = 10
    timeout: int = 0  # seconds for this worker, after which its trial stops and is queued again; 0 = no limit
    storage: str = ""  # Optuna storage URL; "" = sqlite:///optuna.db beside mlflow.db
    seed: int = 0  # flows to Keras, tf.data and the Optuna sampler
    space: str = "full"  # search space, see emnist_exp.search.SPACES
    pruner: str = "median"  # median | hyperband | none
    total_trials: int = 0  # COMPLETE trials the study needs, across all workers; 0 = no cap (n_trials per worker)
    # faults: a worker silent for grace_period seconds has its trial failed and retried by another
    heartbeat_interval: int = 60  # seconds between a running trial's heartbeats
    grace_period: int = 180  # three missed heartbeats: long enough for a busy database to catch up
    # training
    epochs: int = 10
    patience: int = 3  # early stopping on val_accuracy
    shuffle_buffer: int = 10_000  # ~8 MB of uint8 images: the RAM ceiling stays flat
    precision: str = "auto"  # auto | float32 | mixed_bfloat16 | mixed_float16; models leave in float32 (precision.py)
    preset: str = ""  # the preset these values came from, for the record

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _coerce(name: str, value: Any) -> Any:
    """Convert a CLI string or TOML value to the field's type, or say what is wrong."""
    kind = type(FIELDS[name].default)
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        try:
            if kind is bool:
                if text.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                    raise ValueError(text)
                return text.lower() in {"true", "1", "yes"}
            return kind(float(text)) if kind is int and float(text).is_integer() else kind(text)
        except ValueError:
            raise UserError(f"{name} must be {kind.__name__}, got {value!r}.") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{name} must be {kind.__name__}, got {value!r}.")
    return value


def _check(cfg: Config) -> Config:
    """Range checks that no type can express."""
    rules = [
        (cfg.n_trials >= 1, "n_trials must be at least 1"),
        (cfg.epochs >= 1, "epochs must be at least 1"),
        (cfg.max_examples >= 0, "max_examples must be 0 (all) or positive"),
        (cfg.timeout >= 0, "timeout must be 0 (none) or a number of seconds"),
        (0.0 < cfg.val_fraction < 0.5, "val_fraction must be between 0 and 0.5"),
        (cfg.patience >= 1, "patience must be at least 1"),
        (cfg.shuffle_buffer >= 1, "shuffle_buffer must be at least 1"),
        (cfg.pruner in {"median", "hyperband", "none"}, "pruner must be median, hyperband or none"),
        (bool(cfg.study.strip()), "study must not be empty"),
        (len(cfg.study.encode()) <= MAX_STUDY_BYTES, f"study must be at most {MAX_STUDY_BYTES} bytes long (UTF-8), "
         f"got {len(cfg.study.encode())}: it names the study's MLflow experiment, its runs and its artifact folder"),
        (not ("'" in cfg.study and '"' in cfg.study), "study may hold ' or \" but not both: MLflow's search "
         "filters, which find a study's runs, cannot quote such a name"),
        (0 <= cfg.seed < 2**32, "seed must be between 0 and 4294967295 (2**32 - 1), the range NumPy and "
         "TensorFlow accept"),
        (cfg.total_trials >= 0, "total_trials must be 0 (no cap) or positive"),
        (cfg.heartbeat_interval >= 1, "heartbeat_interval must be at least 1 second"),
        (cfg.grace_period > cfg.heartbeat_interval, "grace_period must be longer than heartbeat_interval"),
    ]
    for ok, message in rules:
        if not ok:
            raise UserError(message + ".")
    if cfg.precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}.")
    from emnist_exp.search import SPACES  # noqa: PLC0415 (keeps --help free of Optuna)

    if cfg.space not in SPACES:
        raise UserError(f"space must be one of {', '.join(SPACES)}, got {cfg.space!r}.")
    return cfg


def preset_path(name: str) -> Path:
    """A preset is a name in experiments/ or a path to a .toml file."""
    path = Path(name) if name.endswith(".toml") else PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.toml"))) or "none"
        raise UserError(f"unknown preset {name!r}: known presets are {known}.")
    return path


def expand(text: str, preset: str) -> str:
    """A preset's string with each ${NAME} and ${NAME:-fallback} filled in from the environment."""

    def fill(match: re.Match) -> str:
        name, fallback = match.groups()
        if os.environ.get(name):
            return os.environ[name]
        if fallback is None:
            raise UserError(f"preset {preset} uses ${{{name}}}, which is not set.")
        return fallback

    return VARIABLE.sub(fill, text)


def _preset_values(name: str) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """A preset's overrides, expanded, and for each key the environment variables its value names."""
    path = preset_path(name)
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"preset {path} is not valid TOML: {exc}.") from None
    unknown = sorted(set(values) - set(FIELDS) - {"preset"})
    if unknown:
        raise UserError(f"preset {path.name} has unknown keys: {', '.join(unknown)}.")
    names = {k: VARIABLE.findall(v) for k, v in values.items() if isinstance(v, str) and VARIABLE.search(v)}
    values = {k: expand(v, path.name) if k in names else v for k, v in values.items()}
    return {k: _coerce(k, v) for k, v in values.items()}, {k: [n for n, _ in found] for k, found in names.items()}


def load_preset(name: str) -> dict[str, Any]:
    """Read a preset's overrides, environment variables filled in; an unknown key or a wrong type is an error."""
    return _preset_values(name)[0]


def _check_preset_folder(preset: str, dataset: str, names: list[str]) -> None:
    """An idx: folder the preset took from the environment must exist; if not, say which variable sets it."""
    folder = dataset[len("idx:") :]
    if not dataset.startswith("idx:") or Path(folder).is_dir():
        return
    name = names[0]
    where = (f"{name}, which names {folder}, not a folder" if os.environ.get(name)
             else f"{name}, which is unset, and the fallback {folder} is not a folder")
    raise UserError(f"the {preset} preset reads its folder from {where}: set {name} to a folder with the official "
                    "EMNIST bymerge files (the gzip/ folder of EMNIST's gzip.zip), or pass --dataset idx:<folder> "
                    "(-P dataset=idx:<folder> under mlflow run).")


def resolve(overrides: dict[str, Any]) -> Config:
    """Defaults, then the preset (if any), then explicit overrides. None or '' means unset."""
    given = {k: v for k, v in overrides.items() if v is not None and v != ""}
    unknown = sorted(set(given) - set(FIELDS))
    if unknown:
        raise UserError(f"unknown settings: {', '.join(unknown)}.")
    values: dict[str, Any] = {}
    if given.get("preset"):
        preset, names = _preset_values(given["preset"])
        values.update(preset)
        if "dataset" in names and "dataset" not in given:  # a --dataset flag replaces the preset's folder
            _check_preset_folder(given["preset"], preset["dataset"], names["dataset"])
    values.update({k: _coerce(k, v) for k, v in given.items()})
    if "space" in values:
        from emnist_exp.search import space_name  # noqa: PLC0415

        values["space"] = space_name(values["space"])
    return _check(Config(**values))
