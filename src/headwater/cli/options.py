"""Command-line flags generated from the config dataclasses, so flags and the Python API agree.

`command(app, ConfigA, ConfigB)(fn)` registers `fn` with its own parameters plus one flag per
field of each config (nested configs flattened). Flags default to "not given", and the command
receives `configs={ConfigA: ..., ConfigB: ...}` resolved as: the dataclass defaults, then a
`--config FILE` saved by an earlier run, then the flags given. A flag shared by several configs
(`--batch-size`) sets the field in each, and must mean the same thing in each (same help text).
"""

from __future__ import annotations

import functools
import inspect
import json
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import typer

from ..config import Config, default_of, flag_of, nested_config
from ..errors import UserError


def fail(message: str) -> None:
    """One line on stderr, exit status 2: the CLI's answer to bad input."""
    message = " ".join(str(message).split())  # one line, even for multi-line messages of other libraries
    typer.echo(f"headwater: error: {message}", err=True)
    raise typer.Exit(2)


@dataclass
class Flag:
    """One command-line flag and the config fields it sets."""

    flag: str
    help: str
    hint: Any
    choices: tuple | None
    targets: list[tuple[type, tuple[str, ...], Any]] = field(default_factory=list)  # (config class, field path, default)

    @property
    def param(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def flags_of(*classes: type[Config]) -> dict[str, Flag]:
    """Every flag of `classes`, by flag name; raises if a shared flag's help texts differ."""
    out: dict[str, Flag] = {}

    def walk(top: type[Config], cls: type[Config], path: tuple[str, ...]) -> None:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if not f.metadata.get("cli", True):
                continue
            sub = nested_config(hints[f.name])
            if sub is not None:
                walk(top, sub, (*path, f.name))
                continue
            name = flag_of(f)
            flag = out.setdefault(name, Flag(name, f.metadata["help"], hints[f.name], f.metadata.get("choices")))
            if flag.help != f.metadata["help"]:
                raise ValueError(f"{name} means two things: {flag.help!r} vs {f.metadata['help']!r}")
            flag.targets.append((top, (*path, f.name), default_of(f)))

    for cls in classes:
        walk(cls, cls, ())
    return out


def _annotation(hint) -> Any:
    """The typer annotation of a field's type (always optional: absent means "not given")."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) in (typing.Union, types.UnionType) else [hint]
    base = args[0]
    if typing.get_origin(base) is list:
        return list[typing.get_args(base)[0]] | None
    return base | None


def _help(flag: Flag) -> str:
    defaults = {json.dumps(d) if not isinstance(d, str) else d for _, _, d in flag.targets}
    if len(defaults) == 1:
        shown = defaults.pop()
        return f"{flag.help} (default: {shown})" if shown not in ("null", "None") else flag.help
    # a None default is filled in by its config (the help says how), so it is not listed
    per = ", ".join(f"{d} ({cls.__name__.removesuffix('Config') or cls.__name__})" for cls, _, d in flag.targets if d is not None)
    return f"{flag.help} (default: {per})"


def _parameter(flag: Flag) -> inspect.Parameter:
    ann = Literal[tuple(flag.choices)] | None if flag.choices else _annotation(flag.hint)
    decls = [f"{flag.flag}/--no-{flag.flag[2:]}"] if ann == bool | None else [flag.flag]
    option = typer.Option(None, *decls, help=_help(flag), show_default=False)
    return inspect.Parameter(flag.param, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=ann)


def resolve(classes: tuple[type[Config], ...], flags: dict[str, Flag], given: dict[str, Any], config_file: Path | None) -> dict[type, Config]:
    """Each config from its defaults, then the saved file, then the flags given."""
    saved = json.loads(Path(config_file).read_text()) if config_file else {}
    if config_file and len(classes) == 1 and classes[0].__name__ not in saved:
        saved = {classes[0].__name__: saved}  # a config.json written by Config.save
    values = {cls: cls.from_dict(saved.get(cls.__name__, {})).to_dict() for cls in classes}
    for flag in flags.values():
        value = given.get(flag.param)
        if value is None or value == []:
            continue
        for cls, path, _ in flag.targets:
            node = values[cls]
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = list(value) if isinstance(value, (list, tuple)) else value
    return {cls: cls.from_dict(v) for cls, v in values.items()}


CONFIG_OPTION = inspect.Parameter(
    "config",
    inspect.Parameter.KEYWORD_ONLY,
    annotation=Path | None,
    default=typer.Option(None, "--config", help="Replay the settings saved by an earlier run (a JSON file); flags given here override them."),
)


def command(app: typer.Typer, *classes: type[Config], name: str | None = None):
    """Register the decorated function as a command with flags for every field of `classes`."""
    flags = flags_of(*classes)

    def decorate(fn):
        own = [p for p in inspect.signature(fn).parameters.values() if p.name != "configs"]
        clash = {p.name for p in own} & set(flags)
        if clash:
            raise ValueError(f"{fn.__name__}: parameters {clash} clash with config flags")
        generated = [_parameter(f) for f in flags.values()] + ([CONFIG_OPTION] if classes else [])

        @functools.wraps(fn)
        def wrapper(**kwargs):
            mine = {p.name: kwargs.pop(p.name) for p in own}
            try:
                configs = resolve(classes, flags, kwargs, kwargs.get("config"))
                return fn(**mine, configs=configs) if classes else fn(**mine)
            except UserError as exc:
                fail(str(exc))

        params = own + generated
        wrapper.__signature__ = inspect.Signature(params)
        hints = typing.get_type_hints(fn)
        wrapper.__annotations__ = {p.name: hints.get(p.name, p.annotation) for p in params}
        app.command(name or fn.__name__.replace("_", "-"))(wrapper)
        return fn

    return decorate


def config_path(out: Path) -> Path:
    """Where a command that writes `out` saves its resolved settings: `OUT.config.json` beside it."""
    return out.with_name(out.name + ".config.json")


def save_configs(out: Path, *configs: Config) -> Path:
    """Save the resolved configs beside `out`, keyed by class name (what `--config` replays)."""
    path = config_path(out)
    path.write_text(json.dumps({type(c).__name__: c.to_dict() for c in configs}, indent=2, sort_keys=True) + "\n")
    return path
