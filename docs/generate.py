"""Write the two references of the manual from the code, so they cannot drift from it:
``docs/reference/settings.md`` from the settings table (:mod:`yadtqd.config`) and
``docs/reference/cli.md`` from the parsers of ``yadtqd`` and ``yadtqctl``.

    .venv/bin/python docs/generate.py          # rewrite both
    .venv/bin/python docs/generate.py --check  # exit 1 if either is out of date (tests do this)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yadtqd import cli, config  # noqa: E402
from yadtqd.ctl import main as ctl  # noqa: E402

HERE = Path(__file__).resolve().parent / "reference"


def settings() -> str:
    """The settings reference, one table per section."""
    lines = ["# Settings", "",
             "Generated from the settings table in `yadtqd/config.py` by `docs/generate.py`.", "",
             "One TOML file (`--config`, else `$YADTQ_CONFIG`, else `/etc/yadtq/yadtq.toml`), then",
             "environment variables, then flags, in rising precedence. An unknown key, a wrong type",
             "or a value out of range exits with status 78 and one line naming the key and where it",
             "came from.", "",
             "## `[kafka]`", "",
             "librdkafka settings, passed through unchanged (TLS and SASL need no code);",
             '`"bootstrap.servers"` is required. Environment: `YADTQ_KAFKA_<KEY>` with dots as',
             "underscores. A key librdkafka does not know, or a value it rejects, is a configuration",
             "error at start. YADTQ forces `acks=all` and idempotence on producers, and no offset",
             "commits on consumers.", ""]
    for name, cls in {"": config.Config, **config.SECTIONS}.items():
        fields = [f for f in dataclasses.fields(cls) if "help" in f.metadata]
        lines += [f"## `[{name}]`" if name else "## Top level", "",
                  "| key | default | environment | meaning |", "|---|---|---|---|"]
        for f in fields:
            env = f"YADTQ_{name.upper()}_{f.name.upper()}" if name else f"YADTQ_{f.name.upper()}"
            help_text = f.metadata["help"].replace("|", "\\|")
            lines.append(f"| `{f.name}` | `{config._toml_value(f.default)}` | `{env}` | {help_text} |")
        lines.append("")
    return "\n".join(lines)


def commands() -> str:
    """Every command's ``--help``, as the parsers print it."""
    lines = ["# Commands", "",
             "Generated from the command-line parsers by `docs/generate.py`.", ""]
    for prog, parser in (("yadtqd", cli.parser()), ("yadtqctl", ctl.parser())):
        lines += [f"## `{prog}`", "", "```text", _help(parser), "```", ""]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    lines += [f"### `{prog} {name}`", "", "```text", _help(sub), "```", ""]
    return "\n".join(lines)


def _help(parser: argparse.ArgumentParser) -> str:
    parser.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=100)
    return parser.format_help().rstrip()


def main() -> int:
    wanted = {HERE / "settings.md": settings() + "\n", HERE / "cli.md": commands() + "\n"}
    if "--check" in sys.argv[1:]:
        stale = [str(p) for p, text in wanted.items() if not p.exists() or p.read_text() != text]
        if stale:
            print(f"out of date: {', '.join(stale)}; run: python docs/generate.py", file=sys.stderr)
            return 1
        return 0
    HERE.mkdir(exist_ok=True)
    for path, text in wanted.items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
