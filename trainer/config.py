"""Run configuration: YAML files that extend configs/base.yaml, then `key=value` overrides, then validation.

configs/base.yaml is the schema: every valid key appears there with its default. A key that is not in it is an
error naming the nearest valid key; a value of the wrong type is an error naming the key and the expected type.

Where a float is expected, a string that Python's ``float()`` reads is taken as that float: YAML 1.1 (PyYAML) reads
``1e-3`` (no dot) as the string '1e-3', in a file as on the command line (``optim.lr=1e-3``).
"""
from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = REPO_ROOT / "configs" / "base.yaml"
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # model.precision

# Keys whose value may be given in more than one shape.
_FLEXIBLE = {
    "head.margin": (float, int, list, type(None)),
    "head.scale": (float, int, type(None)),
    "train.resume": (str, type(None)),
    "train.max_steps": (int, type(None)),
    "data.synthetic": (dict, type(None)),
    "data.cache_dir": (str, type(None)),
    "deepspeed.zero_stage": (int, type(None)),
    "deepspeed.gradient_clipping": (float, int, type(None)),
}


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message says which key and what was expected."""


def read_json(path: Path, error: type[Exception], not_found: str) -> Any:
    """The JSON document in ``path``; ``error(not_found)`` when there is no such file, ``error`` naming the file and
    the parser's complaint when it is not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(not_found) from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _load_chain(path: Path, seen: tuple = ()) -> dict:
    """Read a YAML file and, recursively, the file named by its `extends:` (relative to the file)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: `extends` forms a cycle: {' -> '.join(map(str, seen + (path,)))}")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    base = _load_chain((path.parent / parent), seen + (path,))
    return merge(base, data, source=str(path))


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        keys.append(prefix + k)
        if isinstance(v, dict) and v and (prefix + k) not in _FLEXIBLE:
            keys += _flat_keys(v, prefix + k + ".")
    return keys


def _unknown_key(key: str, schema: dict, source: str) -> ConfigError:
    valid = _flat_keys(schema)
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean `{near[0]}`?" if near else ""
    return ConfigError(f"{source}: unknown config key `{key}`{hint}")


def merge(base: dict, over: dict, source: str, prefix: str = "", root: dict | None = None) -> dict:
    """Deep-merge `over` into a copy of `base`; keys of `over` must exist in `base`."""
    root = base if root is None else root
    out = copy.deepcopy(base)
    if not isinstance(over, dict):
        raise ConfigError(f"{source}: `{prefix.rstrip('.')}` must be a mapping, got {over!r}")
    for k, v in over.items():
        key = prefix + k
        if k not in out:
            raise _unknown_key(key, root, source)
        if isinstance(out[k], dict) and isinstance(v, dict) and key not in _FLEXIBLE and key != "model.kwargs":
            out[k] = merge(out[k], v, source, key + ".", root)
        elif isinstance(out[k], dict) and isinstance(v, dict):  # open mappings: merged without a schema
            out[k] = {**out[k], **copy.deepcopy(v)}
        else:
            out[k] = copy.deepcopy(v)
    return out


# Short forms accepted on the command line.
ALIASES = {"loss": "head.loss"}


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML: numbers, booleans, null, [lists], {mappings}).

    `loss=X` is short for `head.loss=X`."""
    if "=" not in text:
        raise ConfigError(f"override `{text}`: expected key=value (e.g. train.epochs=3)")
    key, raw = text.split("=", 1)
    key = ALIASES.get(key.strip(), key.strip())
    if not key:
        raise ConfigError(f"override `{text}`: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _as_float(value: Any) -> float | None:
    """``value`` as a float when it is a string that ``float()`` reads ('1e-3', which YAML 1.1 leaves a string),
    else None."""
    if not isinstance(value, str):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _floats_from_strings(value: Any, default: Any, key: str) -> Any:
    """``value`` with strings that ``float()`` reads turned into floats where ``key`` expects a float (its default is
    a float, or float is one of its shapes; list elements of a key whose shapes include list and float)."""
    wants_float = float in _FLEXIBLE[key] if key in _FLEXIBLE else isinstance(default, float)
    if not wants_float:
        return value
    parsed = _as_float(value)
    if parsed is not None:
        return parsed
    if isinstance(value, list) and key in _FLEXIBLE and list in _FLEXIBLE[key]:
        return [x if _as_float(x) is None else _as_float(x) for x in value]
    return value


def _type_ok(value: Any, default: Any, key: str) -> bool:
    if key in _FLEXIBLE:
        return isinstance(value, _FLEXIBLE[key]) and not isinstance(value, bool)
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, type(default))


def _check_types(cfg: dict, schema: dict, prefix: str = "") -> None:
    for k, default in schema.items():
        key = prefix + k
        value = cfg[k] = _floats_from_strings(cfg[k], default, key)
        if not _type_ok(value, default, key):
            want = " or ".join(t.__name__ for t in _FLEXIBLE[key]) if key in _FLEXIBLE else type(default).__name__
            raise ConfigError(f"config key `{key}`: expected {want}, got {value!r} ({type(value).__name__})")
        if isinstance(default, float) and isinstance(value, int):
            cfg[k] = float(value)
        if isinstance(default, dict) and default and key not in _FLEXIBLE and key != "model.kwargs":
            _check_types(value, default, key + ".")


def _check_values(cfg: dict) -> None:
    def need(cond: bool, key: str, what: str) -> None:
        if not cond:
            raise ConfigError(f"config key `{key}`: {what}")

    t, d, h = cfg["train"], cfg["data"], cfg["head"]
    need(t["batch_size"] > 0, "train.batch_size", "must be > 0")
    need(t["epochs"] > 0, "train.epochs", "must be > 0")
    need(t["log_every"] > 0, "train.log_every", "must be > 0")
    need(t["max_steps"] is None or t["max_steps"] > 0, "train.max_steps", "must be > 0 or null")
    need(0.0 <= h["sample_rate"] <= 1.0, "head.sample_rate", "must be within [0, 1]")
    need(h["scale"] is None or h["scale"] > 0, "head.scale", "must be > 0 (or null: the loss's default)")
    need(cfg["model"]["precision"] in PRECISIONS, "model.precision",
         f"must be {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}")
    need(cfg["model"]["loss_scale"] > 0, "model.loss_scale", "must be > 0 (the initial fp16 loss scale)")
    need(d["loader"] in ("auto", "torch", "dali"), "data.loader", "must be auto, torch or dali")
    need(d["num_workers"] >= 0, "data.num_workers", "must be >= 0")
    need(d["max_bad_images"] >= 0, "data.max_bad_images", "must be >= 0 (0 = stop at the first damaged image)")
    need(d["root"] is not None, "data.root", "is required: a folder holding train.rec, train.idx and property")
    need(cfg["schedule"]["type"] in ("poly", "step"), "schedule.type", "must be poly or step")
    need(cfg["schedule"]["warmup_epochs"] >= 0, "schedule.warmup_epochs", "must be >= 0")
    need(cfg["optim"]["lr"] > 0, "optim.lr", "must be > 0")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> dict:
    """The resolved configuration: base.yaml <- the chain of `path` <- overrides; validated."""
    schema = _read_yaml(BASE_CONFIG)
    schema.pop("extends", None)
    cfg = copy.deepcopy(schema)
    if path is not None:
        path = Path(path)
        chain = _load_chain(path)
        cfg = merge(cfg, chain, source=str(path))
    for text in overrides:
        keys, value = parse_override(text)
        cfg = merge(cfg, _nest(keys, value), source=f"override `{text}`")
    _check_types(cfg, schema)
    _check_values(cfg)
    cfg["_config_path"] = str(path) if path is not None else None
    return cfg


def _nest(keys: list[str], value: Any) -> dict:
    out: Any = value
    for k in reversed(keys):
        out = {k: out}
    return out


def dump_config(cfg: dict) -> str:
    return yaml.safe_dump({k: v for k, v in cfg.items() if not k.startswith("_")}, sort_keys=False)
