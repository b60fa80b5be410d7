"""Checks of the command line before Hydra runs, so that a mistake costs one line and nothing
in the run folder.

Hydra reports a typo in a group value or key over several lines (with its search path), and it
writes `.hydra/` and the log into `hydra.run.dir` before any of our code runs: pointed at the
subject's images it would add files there, and pointed at a finished run it would overwrite the
record of how that run was configured. So `train.py` and `evaluate.py` first compose the config
the way Hydra will, and stop with `t2ilab: error: ...` (exit 2) when:
- an override cannot be parsed, names a group value that does not exist, or a key that does not
  exist (with the closest names);
- `hydra.run.dir` is the user's data (or holds it, or lies inside it);
- `hydra.run.dir` holds a finished or an interrupted run and no `ckpt_path` continues it.
A run that does continue in its folder writes its Hydra record to `.hydra/resume_<n>/`, so the
first record stays as it was.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from t2ilab.errors import UserError
from t2ilab.run_folder import check_run_folder, user_data_dirs

# Options that show something instead of running: Hydra handles them as it always does.
_SHOW_ONLY = {"--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--info", "-i"}
_SHOW_ONLY_PREFIXES = ("--cfg=", "--info=", "--shell-completion", "-sc", "--experimental-rerun")
_WITH_VALUE = {
    "--config-dir": "config_dir",
    "-cd": "config_dir",
    "--config-name": "config_name",
    "-cn": "config_name",
    "--config-path": "config_path",
    "-cp": "config_path",
}
_FLAGS = {"--multirun", "-m", "--resolve", "--run", "-r"}


def parse_command_line(argv: Sequence[str]) -> dict | None:
    """The parts of a Hydra command line preflight needs; None for --help, --cfg and the like."""
    options: dict[str, str] = {}
    overrides: list[str] = []
    multirun = False
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in _SHOW_ONLY or arg.startswith(_SHOW_ONLY_PREFIXES):
            return None
        name, eq, value = arg.partition("=")
        if name in _WITH_VALUE:
            if not eq:
                i += 1
                value = args[i] if i < len(args) else ""
            options[_WITH_VALUE[name]] = value
        elif arg in _FLAGS:
            multirun = multirun or arg in ("--multirun", "-m")
        elif arg.startswith("-"):
            return None  # an option this module does not know: leave it to Hydra
        else:
            overrides.append(arg)
        i += 1
    return {
        "config_dir": options.get("config_dir"),
        "config_name": options.get("config_name"),
        "overrides": overrides,
        "multirun": multirun,
    }


def preflight(conf_dir: Path, config_name: str, argv: Sequence[str]) -> None:
    """Run the checks for `python <script> ARGV`; prints one line and exits 2 on a mistake.
    May append `hydra.output_subdir=...` to sys.argv (a run continued in its own folder)."""
    command = parse_command_line(argv)
    if command is None:
        return
    try:
        extra = check(conf_dir, config_name, command)
    except UserError as err:
        print(f"t2ilab: error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.argv.extend(extra)


def check(conf_dir: Path, default_name: str, command: dict) -> list[str]:
    """The checks; returns overrides to add to the command line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    overrides = command["overrides"]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as err:
        raise UserError(_parse_error(overrides, err)) from None
    representative, sweeps = [], []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            sweeps.append(override)
            if override.value_type.name == "GLOB_CHOICE_SWEEP":
                continue  # checked by Hydra against the options it finds
            values = list(override.sweep_string_iterator())
            _check_group_values(conf_dir, override.key_or_group, values)
            representative.append(f"{key}={values[0]}")
        else:
            representative.append(override.input_line)
    config_dir = Path(command["config_dir"]).resolve() if command["config_dir"] else None
    cfg = compose(conf_dir, config_dir, command["config_name"] or default_name, representative)
    if command["multirun"] or str(OmegaConf.select(cfg, "hydra.mode", default="")) in (
        "MULTIRUN",
        "RunMode.MULTIRUN",
    ):
        return []
    if sweeps:  # a sweep config sets hydra.mode: MULTIRUN itself; a plain run needs -m
        override = sweeps[0]
        raise UserError(
            f"{override.input_line} lists several values: add -m to sweep over them, or quote "
            f"the value ({override.get_key_element()}='...') if it is one string"
        )
    run_dir = _given_run_dir(parsed)
    if run_dir is None:
        return []
    ckpt = OmegaConf.select(cfg, "ckpt_path", default=None)
    return check_run_folder(run_dir, user_data_dirs(cfg), ckpt, cfg, task=default_name)


def compose(conf_dir: Path, config_dir: Path | None, name: str, overrides: list[str]) -> DictConfig:
    """The config Hydra will compose (with --config-dir searched first, as Hydra does)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException, MissingConfigException

    import t2ilab.launch  # noqa: F401  (registers the resolvers the configs use)

    primary, extra = (
        (config_dir, [f"hydra.searchpath=[file://{conf_dir}]"])
        if config_dir
        else (
            conf_dir,
            [],
        )
    )
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(primary), version_base="1.3"):
            return hydra_compose(name, overrides=extra + overrides, return_hydra_config=True)
    except MissingConfigException as err:
        raise UserError(_missing_config(err, name, primary)) from None
    except ConfigCompositionException as err:
        raise UserError(_composition_error(err, conf_dir, config_dir, name, overrides)) from None
    finally:
        GlobalHydra.instance().clear()


def _given_run_dir(parsed) -> Path | None:
    """hydra.run.dir as given (the last one wins, as in Hydra)."""
    given = [o for o in parsed if o.get_key_element() == "hydra.run.dir"]
    return Path(str(given[-1].value())).expanduser() if given else None


def _check_group_values(conf_dir: Path, group: str, values: list[str]) -> None:
    folder = conf_dir / group.replace(".", "/")
    if not folder.is_dir():
        return  # a plain key: compose checks it
    options = sorted(p.stem for p in folder.glob("*.yaml"))
    for value in values:
        if value not in options and value != "null":
            raise UserError(_unknown_option(group, value, options))


def _unknown_option(group: str, value: str, options: list[str]) -> str:
    close = difflib.get_close_matches(value, options, n=1)
    hint = f"did you mean {group}={close[0]}? " if close else ""
    return f"{group}={value} is not one of conf/{group}/: {hint}choose from {', '.join(options)}"


def _missing_config(err, name: str, primary: Path) -> str:
    text = str(err)
    options = list(getattr(err, "options", None) or [])
    if "Could not find '" in text and options:
        missing = text.split("Could not find '", 1)[1].split("'", 1)[0]
        group, _, value = missing.rpartition("/")
        return _unknown_option(group, value, options)
    if "primary config" in text:
        names = sorted(p.stem for p in primary.glob("*.yaml"))
        return f"--config-name {name} is not in {primary}: choose from {', '.join(names)}"
    return text.splitlines()[0]


def _composition_error(err, conf_dir, config_dir, name: str, overrides: list[str]) -> str:
    text = str(err)
    first = text.splitlines()[0]
    if first.startswith("Could not override '"):
        key = first.split("'", 2)[1]
        value = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key), "...")
        others = [o for o in overrides if o.split("=", 1)[0] != key]
        close = _close_keys(conf_dir, config_dir, name, others, key)
        hint = f"did you mean {close}? " if close else ""
        return (
            f"{key} is not a config key: {hint}fix the name, or add a new key with +{key}={value}"
        )
    if first.startswith("Could not append to config"):
        key = next((o[1:].split("=", 1)[0] for o in overrides if o.startswith("+")), "the key")
        return f"{key} already exists: set it without the leading +"
    return f"{first} {' '.join(text.splitlines()[1:2])}".strip()


def _close_keys(conf_dir, config_dir, name: str, overrides: list[str], key: str) -> str | None:
    """The existing key most like `key`, from the config without the bad override."""
    try:
        cfg = compose(conf_dir, config_dir, name, overrides)
    except UserError:
        return None
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return None
    # A flat key that became a nested one: data.cache_latents -> data.cache.latents.
    head, _, tail = leaf.partition("_")
    if tail and isinstance(node.get(head), DictConfig) and tail in node[head]:
        return f"{parent}.{head}.{tail}" if parent else f"{head}.{tail}"
    close = difflib.get_close_matches(leaf, [str(k) for k in node.keys()], n=1)
    return f"{parent}.{close[0]}" if close and parent else (close[0] if close else None)


def _parse_error(overrides: list[str], err) -> str:
    bad = next((o for o in overrides if "=" not in o and not o.startswith("~")), None)
    if bad is not None:
        return f"cannot read the override {bad!r}: write it as key=value"
    first = str(err).splitlines()[0]
    return (
        f"cannot read the overrides ({first}): quote values with brackets or commas, e.g. key='[a'"
    )
