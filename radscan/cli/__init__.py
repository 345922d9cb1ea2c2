"""The `radscan` command line: parses options, calls the library, maps outcomes to exit codes.

Every option can also come from a ``RADSCAN_<COMMAND>_<OPTION>`` environment variable (e.g.
``RADSCAN_SCAN_WORKERS=4``), which suits cron jobs. The group, its settings (TOML, variables) and
the entry point are here; the commands live in radscan.cli.scoring (scan, score) and
radscan.cli.models (train, info, evaluate, calibrate, report), the options they share in
radscan.cli.common.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from radscan import __version__
from radscan.cli.common import EXIT_CODES_HELP, failure, json_failure, read_settings
from radscan.cli.models import calibrate, evaluate, export, info, report, train
from radscan.cli.scoring import listen, scan, score
from radscan.errors import RadscanError
from radscan.logs import configure as configure_log
from radscan.logs import error_line
from radscan.stopping import Terminated, install_stop_handlers

__all__ = ["cli", "main"]

def _configure_logging(verbosity: int) -> None:
    configure_log({-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG))


class _Radscan(click.Group):
    """The group, keeping the arguments it hands its command (ctx.meta["command_args"]): its callback
    checks the environment only for a command that runs, not one asked for its --help."""

    def resolve_command(self, ctx: click.Context, args: list[str]):  # type: ignore[override]
        name, command, rest = super().resolve_command(ctx, args)
        ctx.meta["command_args"] = list(rest)
        return name, command, rest


@click.group(cls=_Radscan, epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="radscan")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr, no progress bar.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              envvar="RADSCAN_CONFIG", help="TOML settings file with one table per command (e.g. [score]).")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool, config_file: Path | None) -> None:
    """radscan: unsupervised anomaly triage of chest radiographs (DICOM, JPEG, PNG).

    For research and triage support only: radscan does not diagnose.

    Settings come from, highest first: command-line options, RADSCAN_<COMMAND>_<OPTION>
    environment variables, the --config TOML file (tables [scan], [train], [score]; keys are
    option names with underscores), then the defaults.
    """
    _configure_logging(-1 if quiet else verbose)
    ctx.obj = {"quiet": quiet, "verbose": verbose, "config": config_file}
    if config_file:
        ctx.default_map = _read_config(config_file)
    # help is shown whatever the environment holds (a review: a stale misspelt variable blocked --help)
    asks_help = {"-h", "--help"} & set(ctx.meta.get("command_args", ()))
    if ctx.invoked_subcommand in cli.commands and not asks_help:
        _refuse_unknown_variables(cli.commands[ctx.invoked_subcommand])


def _refuse_unknown_variables(command: click.Command) -> None:
    """A RADSCAN_<COMMAND>_<OPTION> variable that names no option of the command run is a usage
    error, as an unknown key of its --config table is (a trial: RADSCAN_SCORE_PHII=hash was ignored,
    and patient identifiers were written in clear). Variables of other commands are not looked at."""
    import difflib

    prefix = f"RADSCAN_{command.name.upper()}_"
    by_option = {opt[2:].replace("-", "_").upper(): param.envvar for param in command.params
                 if isinstance(param, click.Option) and param.envvar for opt in param.opts if opt.startswith("--")}
    known = set(by_option.values())
    prefixed = sorted(name for name in known if name.startswith(prefix))
    for name in sorted(os.environ):
        if name.startswith(prefix) and name not in known:
            # an option whose variable has no command in it (--model: RADSCAN_MODEL) is named as it is
            close = ([by_option[name[len(prefix):]]] if name[len(prefix):] in by_option
                     else difflib.get_close_matches(name, prefixed, n=1))
            raise click.UsageError(f"the environment variable {name} names no option of radscan {command.name}"
                                   + (f" (did you mean {close[0]}?)" if close else "")
                                   + f": its options' variables are {prefix}<OPTION>"
                                   + (f", e.g. {prefixed[0]}" if prefixed else ""))


def _read_config(path: Path) -> dict:
    """TOML tables [scan], [train], [score] of option names -> Click's default_map."""
    try:
        settings = read_settings(path)
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--config") from None
    default_map = {}
    for name, table in settings.items():
        command = cli.commands.get(name)
        if not isinstance(table, dict):  # a key before any table (verbose = true): not a command's setting
            raise click.BadParameter(f"{name} = {_shown(name, table)} in {path} stands outside a table: settings "
                                     "go under their command's table, e.g. [score]", param_hint="--config")
        if command is None:
            raise click.BadParameter(f"[{name}] in {path} is not a radscan command", param_hint="--config")
        by_option = {opt.lstrip("-").replace("-", "_"): param for param in command.params
                     for opt in param.opts if opt.startswith("--")}
        unknown = sorted(k for k in table if k.replace("-", "_") not in by_option)
        if unknown:
            raise click.BadParameter(f"[{name}] in {path}: unknown option(s) {', '.join(unknown)}",
                                     param_hint="--config")
        default_map[name] = {}
        for key, value in table.items():
            param = by_option[key.replace("-", "_")]
            try:
                default_map[name][param.name] = _setting(param, value)
            except click.BadParameter as exc:  # named as the file spells it, where it stands
                raise click.BadParameter(f"{key!r} in the [{name}] table of {path}: {exc.message}",
                                         param_hint="--config") from None
    return default_map


def _as_toml(value: object) -> str:
    """A value as a settings file spells it (true, not Python's True)."""
    return str(value).lower() if isinstance(value, bool) else repr(value)


# keys whose values are secrets: a refusal names the key and what is wrong, never the value (a review:
# the site's PHI key was printed to stderr, which the nightly wrapper keeps in its log)
SECRET_KEYS = ("phi_key",)


def _shown(key: str, value: object) -> str:
    """`value` as a refusal may show it: spelt as TOML, or hidden for a secret key."""
    return "(the value, not shown)" if key.replace("-", "_") in SECRET_KEYS else _as_toml(value)


def _setting(param: click.Parameter, value: object) -> object:
    """A TOML value as the option expects it: a list for a comma-separated option (modalities =
    ["CR", "DX"]) is joined with commas; options given several times take a list (one text is a list
    of one). Raises click.BadParameter naming what is wrong (the value only where it is no secret)."""
    shown = _shown(param.name or "", value)
    # a table, a date or a list of lists is no value of any option (a trial: a date crashed, exit 1)
    if not isinstance(value, (str, int, float, list)) or (
            isinstance(value, list) and not all(isinstance(item, (str, int, float)) for item in value)):
        raise click.BadParameter(f"{shown} is not a value radscan reads (text, a number, true/false "
                                 "or a list of them)", param_hint="--config")
    wants_text = isinstance(param.type, (click.Path, click.types.StringParamType, click.Choice))
    if isinstance(value, list) and any(isinstance(item, bool) or (wants_text and not isinstance(item, str))
                                       for item in value):
        # a review: normals = [1, 2] crashed calibrate (exit 1); modalities = [true, "CR"] read as "True,CR"
        raise click.BadParameter(f"{shown} holds an item that is not text in quotes", param_hint="--config")
    if getattr(param, "multiple", False) and isinstance(value, str):
        value = [value]  # one folder for a repeatable option: normals = "/data/normals"
    if isinstance(value, list) and not getattr(param, "multiple", False):
        if not isinstance(param.type, click.types.StringParamType):  # a path, a number, one choice
            raise click.BadParameter(f"{shown} is a list where one value is expected", param_hint="--config")
        return ",".join(str(item) for item in value)
    if isinstance(value, bool) and not getattr(param, "is_flag", False):
        raise click.BadParameter(f"{shown} is true/false where a value is expected",
                                 param_hint="--config")
    if getattr(param, "is_flag", False) and not isinstance(value, bool) and not getattr(param, "count", False):
        # a trial: no_html = 0 crashed the run (exit 1, a traceback)
        raise click.BadParameter(f"{shown} is not true or false", param_hint="--config")
    if isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType)) and isinstance(value, str):
        raise click.BadParameter(f"{shown} is text in quotes where a number is expected",
                                 param_hint="--config")
    if isinstance(param.type, click.types.IntParamType) and isinstance(value, float) and not value.is_integer():
        raise click.BadParameter(f"{shown} is not a whole number", param_hint="--config")
    if wants_text and not getattr(param, "is_flag", False) and not isinstance(value, (str, list)):
        raise click.BadParameter(f"{shown} is not text in quotes", param_hint="--config")
    return value


# added in this order (--help sorts them)
for _command in (scan, train, info, score, listen, evaluate, calibrate, report, export):
    cli.add_command(_command)


def _name_environment_variables() -> None:
    """RADSCAN_<COMMAND>_<OPTION> after the option's name as typed (RADSCAN_SCORE_JSON for --json),
    not Click's default, the Python parameter's name (which would be RADSCAN_SCORE_AS_JSON)."""
    for command_name, command in cli.commands.items():
        for param in command.params:
            long_names = [name for name in param.opts if name.startswith("--")]
            if isinstance(param, click.Option) and param.envvar is None and long_names:
                option = long_names[0][2:].replace("-", "_").upper()
                param.envvar = f"RADSCAN_{command_name.upper()}_{option}"


_name_environment_variables()


def main() -> None:
    """The `radscan` entry point. With --json, a run that fails still prints one JSON object on
    stdout ({"ok": false, "exit_code": ..., "error": ...}), so that a wrapper never keeps an empty
    or stale summary."""
    _reopen_closed_standard_streams()
    install_stop_handlers()
    try:
        code = cli.main(auto_envvar_prefix="RADSCAN", standalone_mode=False)
    except click.ClickException as exc:
        _name_the_source(exc)
        json_failure(*failure(exc))
        if isinstance(exc, click.UsageError) and not isinstance(exc, RadscanError) and exc.ctx is not None:
            # Click's usage and hint lines, then the error as a log line: a failed run's last line is
            # timestamped whatever failed (a review: a usage error ended with Click's bare "Error:")
            click.echo(exc.ctx.get_usage(), err=True)
            click.echo(f"Try '{exc.ctx.command_path} --help' for help.", err=True)
        click.echo(error_line(exc.format_message()), err=True)
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, Terminated) as exc:
        # the run unwinds like any failure (temporary files removed, lock released, earlier outputs
        # intact) and says so, so that a wrapper's summary is never empty
        exit_code, message = failure(exc)
        json_failure(exit_code, message)
        click.echo(error_line(message), err=True)
        sys.exit(exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        json_failure(*failure(exc))
        raise
    sys.exit(code if isinstance(code, int) else 0)


def _name_the_source(exc: click.ClickException) -> None:
    """A bad value that came from a RADSCAN_* variable or the --config file is blamed on it, not
    on the command-line option the user never typed."""
    if not isinstance(exc, click.BadParameter) or exc.ctx is None or exc.param is None or not exc.param.name:
        return
    source = exc.ctx.get_parameter_source(exc.param.name)
    if source == click.core.ParameterSource.ENVIRONMENT and isinstance(exc.param, click.Option):
        names = exc.param.envvar if isinstance(exc.param.envvar, (list, tuple)) else [exc.param.envvar]
        given = [name for name in names if name and name in os.environ]
        exc.param_hint = f"the environment variable {given[0] if given else names[0]}"
    elif source == click.core.ParameterSource.DEFAULT_MAP:
        config = (exc.ctx.obj or {}).get("config")
        # the key as the file spells it: the option's name with underscores (--qc is `qc`, its parameter qc_mode)
        longest = max((name for name in exc.param.opts if name.startswith("--")), key=len, default=exc.param.name)
        key = longest.lstrip("-").replace("-", "_")
        exc.param_hint = f"'{key}' in the [{exc.ctx.info_name}] table of {config or 'the --config file'}"


def _reopen_closed_standard_streams() -> None:
    """Started with stdin, stdout or stderr closed (`>&-`, some schedulers), radscan and its
    decoding workers would fail on every file; the closed stream is pointed at /dev/null instead
    (what it would have received is lost, as its closer intended) and the run goes on."""
    for descriptor, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(descriptor)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != descriptor:
                os.dup2(null, descriptor)  # dup2 makes it inheritable
                os.close(null)
            else:  # os.open gives non-inheritable descriptors: the decoding workers need this one
                os.set_inheritable(descriptor, True)
            mode = "r" if descriptor == 0 else "w"
            setattr(sys, name, open(descriptor, mode, closefd=False))  # noqa: SIM115 (lives as long as the process)
