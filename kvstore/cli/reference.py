"""Renders ``docs/cli.md`` from the commands themselves: ``python -m kvstore.cli.reference``.

``tests/kvstore/test_docs.py`` fails when the committed page differs from this output.
"""

from __future__ import annotations

import click


def render() -> str:
    from kvstore.cli import cli

    out = [
        "# Command line reference\n",
        "Every `kvstore` command and option, exactly as `kvstore COMMAND --help` prints them",
        "(this page is generated: `python -m kvstore.cli.reference > docs/cli.md`).",
        "Sizes take human units (`1GiB`), durations `10s`/`250ms`. Errors print one line",
        "starting with `error:` and exit with status 2.\n",
    ]
    root = click.Context(cli, info_name="kvstore", help_option_names=["-h", "--help"],
                         max_content_width=100, terminal_width=100)
    out.append("```\n" + cli.get_help(root) + "\n```\n")
    for name in sorted(cli.commands):  # type: ignore[attr-defined]
        cmd = cli.commands[name]  # type: ignore[attr-defined]
        ctx = click.Context(cmd, info_name=name, parent=root, help_option_names=["-h", "--help"],
                            max_content_width=100, terminal_width=100)
        out.append(f"## `kvstore {name}`\n")
        out.append("```\n" + cmd.get_help(ctx) + "\n```\n")
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
