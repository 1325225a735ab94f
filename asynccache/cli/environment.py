"""Options from the environment: ``ASYNCCACHE_<OPTION>`` for every flag; the flag wins."""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping
from typing import Any

from asynccache.errors import SetupError

PREFIX = "ASYNCCACHE_"
#: The dest suffix of a global flag's copy after the subcommand (same variable as the flag).
AFTER = "_after"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_KINDS: dict[object, str] = {int: "an integer", float: "a number"}
#: Actions that hold no value of their own.
_NO_VALUE = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def variable(dest: str) -> str:
    """The environment variable of an option: ``ASYNCCACHE_CACHE_DIR`` for ``cache_dir``."""
    return PREFIX + dest.removesuffix(AFTER).upper()


def options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    """The optional arguments of ``parser`` that take a setting (not help, version, commands)."""
    # argparse keeps its actions in a private list; there is no public accessor.
    for action in parser._actions:
        if action.option_strings and not isinstance(action, _NO_VALUE):
            yield action


def annotate_help(parser: argparse.ArgumentParser) -> None:
    """Name each option's variable in its help line."""
    for action in options(parser):
        if action.help is not argparse.SUPPRESS:
            name = variable(action.dest)
            action.help = f"{action.help or ''} [env {name}]".lstrip()


def apply(
    parser: argparse.ArgumentParser, environ: Mapping[str, str]
) -> list[tuple[argparse.Action, str]]:
    """Make each set variable its option's default; return the options and variables applied.

    Copies of an option with no default of their own (SUPPRESS) take nothing: the variable
    goes where the option is first defined. A value that does not parse is a SetupError naming
    the variable, the value and what fits.
    """
    applied: list[tuple[argparse.Action, str]] = []
    for action in options(parser):
        name = variable(action.dest)
        # An empty variable counts as unset, as most tools read them.
        if not environ.get(name) or action.default is argparse.SUPPRESS:
            continue
        action.default = convert(action, name, environ[name])
        applied.append((action, name))
    return applied


def sources(args: argparse.Namespace, applied: list[tuple[argparse.Action, str]]) -> dict[str, str]:
    """dest -> variable, for the options whose value came from a variable (no flag overrode)."""
    return {
        action.dest: name
        for action, name in applied
        if getattr(args, action.dest, None) == action.default
    }


def convert(action: argparse.Action, name: str, text: str) -> Any:
    """The value ``text`` gives the option of ``action``, as its flag would."""
    if isinstance(action, argparse._CountAction):
        return _count(name, text)
    if action.nargs == 0:
        return _boolean(action, name, text)
    if isinstance(action, argparse._AppendAction):
        return [_one(action, name, part.strip()) for part in text.split(",") if part.strip()]
    return _one(action, name, text)


def _count(name: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise SetupError(f"{name}={text!r}: expected a count (0, 1, 2, ...)")
    return value


def _boolean(action: argparse.Action, name: str, text: str) -> bool:
    word = text.strip().lower()
    if word not in _TRUE | _FALSE:
        raise SetupError(f"{name}={text!r}: expected 1/true/yes/on or 0/false/no/off")
    on = word in _TRUE
    if isinstance(action, argparse._StoreConstAction) and action.const is False:
        return not on
    return on


def _one(action: argparse.Action, name: str, text: str) -> Any:
    convert = action.type if callable(action.type) else None
    try:
        value = convert(text) if convert is not None else text
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        kind = _KINDS.get(convert, "a valid value")
        detail = str(exc) if isinstance(exc, argparse.ArgumentTypeError) else f"not {kind}"
        raise SetupError(f"{name}={text!r}: {detail}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise SetupError(f"{name}={text!r}: expected one of {choices}")
    return value
