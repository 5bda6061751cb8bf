"""Every launcher flag reaches the process that reads it, and `--help` shows the default that runs.

The router's options are defined once (router/options.py): the launcher's options of the same
names, their defaults and what it forwards all come from there. These tests hold the whole chain:
a value set at the launcher is parsed by the router's own CLI into the same value, and a value that
changes nothing any child receives must be one the launcher itself consumes (listed below, with why).
"""

from __future__ import annotations

from dataclasses import fields, replace

import pytest

from launcher import commands
from launcher.cli import main as launcher_main
from launcher.config import LauncherArgs
from router.cli import main as router_main
from router.options import OPTIONS

# Launcher options no child reads: the launcher acts on them itself.
LAUNCHER_ONLY = {
    "sharded": "the number of shards (supervisor)",
    "num_shard": "the number of shards (supervisor)",
    "usage_stats": "accepted for TGI compatibility; nothing is ever sent",
    "env": "the launcher logs the runtime environment",
}
NOT_FLAGS = {"explicit", "log_level", "num_gpus"}


def _changed(value: object) -> object:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 7
    if isinstance(value, float):
        return value / 4
    if isinstance(value, tuple):
        return ("https://example.test",)
    return f"{value}-changed"


SPECIAL = {  # values the generic rule cannot invent (choices, formats, None defaults)
    "quantize": "int8", "dtype": "bfloat16", "cuda_graphs": "1,2", "reasoning_parser": "none",
    "usage_stats": "on", "shard_tcp_address": "10.0.0.2:7000", "sharded": True,
}


def _value(field_name: str, default: object, annotation: str) -> object:
    if field_name in SPECIAL:
        return SPECIAL[field_name]
    if default is not None:
        return _changed(default)
    if "int" in annotation:
        return 7
    if "float" in annotation:
        return 0.25
    if "bool" in annotation:
        return True
    return "/tmp/value-" + field_name


def _children(args: LauncherArgs) -> tuple:
    return (commands.build_shard_argv(args, 0, 2), commands.shard_env(args, 0, 2, {}),
            commands.build_router_argv(args), commands.router_env(args, {}), commands.build_download_argv(args))


@pytest.mark.parametrize("field", [f for f in fields(LauncherArgs) if f.name not in NOT_FLAGS], ids=lambda f: f.name)
def test_every_flag_reaches_a_child_or_is_the_launchers_own(field):
    base = LauncherArgs(shard_uds_path="/tmp/pytgi-flags")
    value = _value(field.name, field.default if field.default is not field.default_factory else None, str(field.type))
    assert value != getattr(base, field.name)
    changed = replace(base, **{field.name: value}, explicit=frozenset({field.name}))
    base = replace(base, explicit=frozenset({field.name}))
    reached = _children(changed) != _children(base)
    assert reached != (field.name in LAUNCHER_ONLY), (
        f"--{field.name.replace('_', '-')}: " + ("reaches a child but is listed as the launcher's own" if reached
                                                  else "changes nothing any child receives"))


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_router_options_arrive_as_set(option):
    """Set at the launcher, parsed by the router's own CLI: the same value."""
    value = SPECIAL.get(option.name) or _value(option.name, option.default, option.type.__name__)
    args = LauncherArgs(shard_uds_path="/tmp/pytgi-flags", **{option.name: value}, explicit=frozenset({option.name}))
    argv = commands.build_router_argv(args)
    params = router_main.make_context("text-generation-router", argv[1:]).params
    assert params[option.name] == value


def test_the_old_input_length_alias_arrives_as_max_input_tokens():
    args = LauncherArgs(shard_uds_path="/tmp/pytgi-flags", max_input_length=99, explicit=frozenset({"max_input_length"}))
    params = router_main.make_context("text-generation-router", commands.build_router_argv(args)[1:]).params
    assert params["max_input_tokens"] == 99


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_help_shows_the_default_that_runs(option):
    """The launcher passes an option only when set, so the router's default is the one that runs:
    both CLIs must show it."""
    launcher_param = next(p for p in launcher_main.params if p.name == option.name)
    router_param = next(p for p in router_main.params if p.name == option.name)
    assert router_param.default == option.default
    assert launcher_param.default == option.default == getattr(LauncherArgs(), option.name)
    assert launcher_param.envvar == router_param.envvar == option.envvar
    assert launcher_param.help == router_param.help == option.help
