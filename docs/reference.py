"""Write docs/commands.md, the command reference, from every command's own --help.

    python docs/reference.py          # rewrite docs/commands.md
    python docs/reference.py --check  # exit 1 when docs/commands.md is not what --help says

The help text is the one source (tests/unit/test_reference.py runs the check, so the page cannot
drift from the code); the exit codes in it come from radscan.errors.EXIT_CODE_MEANINGS.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from radscan.cli import cli

PAGE = Path(__file__).with_name("commands.md")
WIDTH = 100  # the help as a terminal this wide shows it, whatever the terminal that runs this


def render() -> str:
    """The page: the group's help, then each command's, in the order `radscan --help` lists them."""
    def context(command: click.Command, name: str, parent: click.Context | None = None) -> click.Context:
        # make_context applies the command's context_settings (-h beside --help) as an invocation does
        return command.make_context(name, [], parent=parent, resilient_parsing=True, terminal_width=WIDTH,
                                    max_content_width=WIDTH)

    def help_of(command: click.Command, name: str, parent: click.Context | None = None) -> str:
        return command.get_help(context(command, name, parent))

    root = context(cli, "radscan")
    parts = ["# Command reference\n",
             "Generated from each command's `--help` by `python docs/reference.py`; do not edit by hand.",
             "Research and triage support only: radscan does not diagnose. Back to the [README](../README.md).\n",
             "## radscan\n", "```text", help_of(cli, "radscan"), "```\n"]
    for name in cli.list_commands(root):
        parts += [f"## radscan {name}\n", "```text", help_of(cli.get_command(root, name), name, root), "```\n"]
    return "\n".join(parts)


def main() -> int:
    page = render()
    if "--check" in sys.argv[1:]:
        if not PAGE.is_file() or PAGE.read_text(encoding="utf-8") != page:
            print(f"{PAGE} is out of date: run python docs/reference.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(page, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
