"""The command line's overrides, checked before Hydra runs them, so a misspelt name is one line.

    python train.py drafter=eagel3
    error: unknown drafter 'eagel3': choose one of eagle1, eagle3, hydra, ...

Hydra reports an unknown group option or key in five to twenty lines (the options, its config search path,
HYDRA_FULL_ERROR). `override_error(argv)` composes the same tree with the command's overrides through
Hydra's public compose API and turns the first failure into one line naming the problem and the fix;
train.py prints it as `error: ...` and stops before `@hydra.main` writes anything. A multirun (`-m`) is
checked one sweep value at a time (each with the other sweeps at their first value). Commands with Hydra's
own flags (--help, --cfg, ...) are left to Hydra.
"""
from __future__ import annotations

import dataclasses
import difflib

MULTIRUN = ("-m", "--multirun")
HELP = "check the spelling, or see `python train.py --help`"


def override_error(argv: list[str]) -> str | None:
    """None when the overrides in `argv` (train.py's arguments) compose, else one line saying why not."""
    flags = [a for a in argv if a.startswith("-")]
    if any(f not in MULTIRUN for f in flags):
        return None  # --help, --cfg job, --info ...: Hydra's own business
    overrides = [a for a in argv if not a.startswith("-")]
    try:
        trials = _trials(overrides) if flags else [overrides]
    except Exception:  # noqa: BLE001 - a sweep expanded only inside Hydra (glob(...)), or bad syntax: Hydra's own
        return None
    for trial in trials:
        bad = _compose_error(trial)
        if bad:
            return bad
    return None


def _trials(overrides: list[str]) -> list[list[str]]:
    """Override lists that between them try every value of every sweep (`drafter=eagle3,medusa`) once."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    values = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
              else [o.input_line] for o in parsed]
    first = [v[0] for v in values]
    trials = [first]
    for i, vs in enumerate(values):
        trials += [first[:i] + [v] + first[i + 1:] for v in vs[1:]]
    return trials


def _compose_error(overrides: list[str]) -> str | None:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    from conf.schema import CONF_DIR

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            compose(config_name="config", overrides=overrides)
    except MissingConfigException as e:
        group, _, name = (e.missing_cfg_file or "").rpartition("/")
        if group and e.options:
            return f"unknown {group} {name!r}: choose one of {', '.join(e.options)}"
        return _first_line(e)
    except (HydraException, OmegaConfBaseException) as e:
        return _key_error(e.__cause__) or _first_line(e)
    return None


def _key_error(cause) -> str | None:
    """An unknown key (with the closest known one) or a bad value, from the OmegaConf error under Hydra's."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    full_key, key, schema = (getattr(cause, k, None) for k in ("full_key", "key", "object_type"))
    if not full_key:
        return None
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        names = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else []
        close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
        parent = full_key.rpartition(".")[0]
        hint = f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else ""
        owner = getattr(schema, "__name__", "the config")
        return f"unknown setting {full_key} ({owner} has no key {str(key)!r}{hint}): {HELP}"
    if isinstance(cause, ValidationError):
        return f"{full_key}: {_first_line(cause)}"
    return None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
