"""One typed config tree for every command: its sections (config_sections.py; sae: config_sae.py), the sweep, loading.

Loaded from YAML (``configs/*.yaml``), then overridden on the command line with
``--section.field=value``. Each field's docstring (the string literal right below it)
is its ``--help`` text. Unknown keys and wrong types raise ``ConfigError`` naming the key.

    cfg = load_config("configs/default.yaml", ["--sae.d_sae=2048", "--train.lr=1e-3"])
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from sae_stream.config_sae import SAEConfig
from sae_stream.config_sections import (
    AnalysisConfig,
    BufferConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    LMConfig,
    LMTrainConfig,
    ResampleConfig,
    TrainConfig,
    WandbConfig,
)

# What one LM forward and one buffer fix for every SAE of a sweep: the batches, the step count, and when
# checkpoints and metric records happen (all members checkpoint together); tf32 is a process-wide torch switch and
# stream_priority picks the one stream all members' steps run on.
SWEEP_SHARED_TRAIN = ("device", "total_tokens", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints",
                      "background_checkpoints", "nan_policy", "cpu_malloc_tuning", "tf32",
                      "stream_priority")
SWEEP_SHARED_RESAMPLE = ("pool_size", "pool_dtype")  # one pool, drawn once per step, for every member resampling
SWEEP_SECTIONS = ("sae", "train", "resample")
SWEEP_RESERVED = ("checkpoints", "sae", "lm", "dashboard")


@dataclass
class SweepConfig:
    saes: list[dict] = field(default_factory=list)
    """SAEs fed by one LM + buffer: {name, sae, train, resample} overrides, one run subdir each; [] = one SAE."""

    def __post_init__(self) -> None:
        names = []
        for i, entry in enumerate(self.saes):
            name = entry.get("name")
            where = f"sweep.saes[{i}]"
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
                raise ConfigError(f"{where} needs a name of letters, digits, '_' or '-' (it names the run's "
                                  f"subdirectory), got {name!r}")
            if name in SWEEP_RESERVED:
                raise ConfigError(f"{where}: name {name!r} is reserved in the run directory; choose another")
            if name in names:
                raise ConfigError(f"{where}: duplicate name {name!r}: each SAE of a sweep needs its own name")
            names.append(name)
            for key, value in entry.items():
                if key != "name" and key not in SWEEP_SECTIONS:
                    raise ConfigError(f"{where} ({name}): unknown key {key!r}; a sweep entry overrides only "
                                      f"{', '.join(SWEEP_SECTIONS)}")
                if key != "name" and not isinstance(value, dict):
                    raise ConfigError(f"{where} ({name}).{key}: expected a mapping of fields, got {value!r}")
            shared = [f"train.{k}" for k in sorted(set(entry.get("train", {})) & set(SWEEP_SHARED_TRAIN))]
            shared += [f"resample.{k}" for k in sorted(set(entry.get("resample", {})) & set(SWEEP_SHARED_RESAMPLE))]
            if shared:
                raise ConfigError(f"{where} ({name}): {shared[0]} is shared by every SAE of a sweep (one stream, one "
                                  f"step count, one pool): set it in the top-level section")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    lm_train: LMTrainConfig = field(default_factory=LMTrainConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resample: ResampleConfig = field(default_factory=ResampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def sweep_members(self) -> list[tuple[str, Config]]:
        """(name, full config) of each SAE of the sweep, in order; [] without a sweep. Raises ConfigError."""
        if not self.sweep.saes:
            return []
        base = {**to_dict(self), "sweep": {"saes": []}}
        members = []
        for i, entry in enumerate(self.sweep.saes):
            try:
                cfg = config_from_dict(merge(base, {k: v for k, v in entry.items() if k != "name"}))
            except ConfigError as e:
                raise ConfigError(f"sweep.saes[{i}] ({entry['name']}): {e}") from None
            members.append((entry["name"], cfg))
        widths = {cfg.sae.d_in for _, cfg in members} | {self.sae.d_in}
        if len(widths - {None}) > 1:
            raise ConfigError(f"sweep: sae.d_in differs between SAEs ({sorted(widths - {None})}) but they read one "
                              "hook: leave sae.d_in null (taken from the hook) or set it once at the top level")
        return members

    def __post_init__(self) -> None:
        if self.buffer.capacity < 2 * self.train.batch_size:
            raise ConfigError(
                f"buffer.capacity ({self.buffer.capacity}) must be >= 2 * train.batch_size ({self.train.batch_size})")
        if self.data.context_len > self.lm.n_ctx:
            raise ConfigError(f"data.context_len ({self.data.context_len}) exceeds lm.n_ctx ({self.lm.n_ctx}), the "
                              f"LM's context: set --data.context_len={self.lm.n_ctx} or less (or, for an LM this "
                              "run trains, a larger lm.n_ctx)")
        if self.train.step_impl == "fused" and self.sae.architecture != "anthropic":
            raise ConfigError(f"train.step_impl=fused covers sae.architecture=anthropic only, not "
                              f"{self.sae.architecture!r}: use step_impl=auto or autograd")
        if self.sweep.saes:
            if self.wandb.enabled:
                raise ConfigError("wandb.enabled is not supported with sweep.saes yet (one wandb run per process): "
                                  "set wandb.enabled=false; each SAE logs to RUN_DIR/NAME/metrics.jsonl")
            self.sweep_members()  # every member must validate now, before any run starts


# ---------------------------------------------------------------------------------------------- helpers


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return `value` converted to `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
            return tuple(_check_type(key, v, a) for v, a in zip(value, args))
        return [_check_type(key, v, args[0]) for v in value]
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = _hints(cls)
    names = {f.name for f in fields(cls)}
    for key in raw:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown config key '{where}' (valid: {', '.join(sorted(names))})")
    kwargs = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, raw[f.name] or {}, key)
        else:
            kwargs[f.name] = _check_type(key, raw[f.name], tp)
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from nested plain data."""
    return _build(Config, raw or {}, "")


def to_dict(cfg: Config) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return list(v)
        return v

    return {f.name: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, f.name)).items()} for f in fields(cfg)}


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--section.field=value` (or `--section.field value`) -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.field=value")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
        elif i + 1 < len(args):
            key, text = arg[2:], args[i + 1]
            i += 1
        else:
            raise ConfigError(f"override {arg!r} has no value: use {arg}=VALUE")
        section, _, name = key.partition(".")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        out.setdefault(section, {})[name] = value
        i += 1
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in over.items():
        if not isinstance(values, dict) or not isinstance(out.get(section, {}), dict):
            out[section] = values
            continue
        out.setdefault(section, {}).update(values)
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found: pass an existing YAML file, or none for the packaged "
                          f"default ({default_config_path()})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start}): save it as "
                          "UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)  # where the parser stopped (0-based in PyYAML)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: "
                          f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (or the embedded default) + `--section.field=value` overrides -> validated Config."""
    return config_from_dict(raw_config(path, overrides))


def raw_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """load_config's nested plain data before validation (for a caller that fills a section in first)."""
    return merge(read_yaml(path if path is not None else default_config_path()), parse_overrides(overrides or []))


def default_config_path() -> Path:
    """The embedded default config, shipped inside the package (also in configs/default.yaml)."""
    return Path(__file__).parent / "assets" / "default.yaml"


def save_config(cfg: Config, path: str | Path) -> None:
    from sae_stream.checkpoint import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------------------------------------- --help


def field_docs(cls: type) -> dict[str, str]:
    """The docstring literal below each field of a dataclass (its --help text)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())  # one line (a table cell)
    return docs


def help_text(markdown: bool = False) -> str:
    """Every field as `--section.field (type, default): doc`, or as markdown tables (the README's reference)."""
    lines = []
    for f in fields(Config):
        cls = _hints(Config)[f.name]
        docs, hints, default = field_docs(cls), _hints(cls), f.default_factory()  # type: ignore[misc]
        lines += [f"\n**{f.name}**\n", "| field | type | default | meaning |", "|---|---|---|---|"] if markdown \
            else [f"\n{f.name}:"]
        for sub in fields(cls):
            value, doc, tp = getattr(default, sub.name), docs.get(sub.name, ""), _type_name(hints[sub.name])
            if markdown:
                cell = doc.replace("|", "\\|")
                lines.append(f"| `{f.name}.{sub.name}` | {tp.replace('|', 'or')} | `{value!r}` | {cell} |")
            else:
                lines += [f"  --{f.name}.{sub.name} ({tp}, default {value!r})", f"      {doc}"]
    return "\n".join(lines).strip("\n")
