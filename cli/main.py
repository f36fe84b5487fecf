"""Entry point of the `surgery` command.

Commands live in `surgery.cli.<name>_cmd` modules; each exposes `COMMANDS`, a list
of click commands or groups. A module is imported only when its command runs (or for
that command's `--help`); `surgery --help` reads names and one-line helps from the
modules' source (`surgery.cli.command_index`), so it imports neither torch nor the
methods. Errors: a `SurgeryError` prints one line and exits 2, and so does an OSError
the environment causes (read-only file system, full disk or quota, no permission); any
other exception exits 1 (with the traceback under `-v`). `-v` turns on INFO logging of the `surgery`
loggers on stderr, `-vv` DEBUG.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import signal
import sys
import traceback
from functools import cache

import click
from surgery.cli.command_index import CommandEntry, command_index

from surgery import __version__
from surgery.errors import SurgeryError

_VERBOSE = {"level": 0}
_LOG_LEVELS = {0: logging.WARNING, 1: logging.INFO}

# OSErrors that come from the machine, not from a bug: one line and exit 2, like bad input.
_ENVIRONMENT_ERRORS = {
    errno.EROFS: "choose an output on a writable file system",
    errno.ENOSPC: "free some space or choose another output directory",
    errno.EDQUOT: "free some space or choose another output directory",
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
}


def environment_error_message(exc: OSError) -> str | None:
    """The one-line message for an OSError the environment caused (read-only, full, no permission), else None."""
    hint = _ENVIRONMENT_ERRORS.get(exc.errno) if exc.errno is not None else None
    if hint is None:
        return None
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or errno.errorcode.get(exc.errno or 0, '')}; {hint}"


@cache
def _index() -> dict[str, CommandEntry]:
    return command_index()


def configure_logging(verbosity: int) -> None:
    """Send the `surgery` loggers to stderr: WARNING by default, INFO with -v, DEBUG with -vv.

    Third-party loggers keep their own settings; the handler is replaced, not stacked, when
    the CLI runs more than once in a process. Records still propagate, so handlers an embedding
    program (or pytest) put on the root logger see them too.
    """
    logger = logging.getLogger("surgery")
    for handler in [h for h in logger.handlers if getattr(h, "_surgery_cli", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname).1s %(name)s: %(message)s"))
    handler._surgery_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(_LOG_LEVELS.get(verbosity, logging.DEBUG))


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(_index()))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is not None:
            return command
        entry = _index().get(name)
        if entry is None:
            return None
        module = importlib.import_module(entry.module)
        for candidate in getattr(module, "COMMANDS", []):
            self.add_command(candidate)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list of `surgery --help`, from the source index where it can be read."""
        rows: list[tuple[str, CommandEntry | click.Command]] = []
        for name in self.list_commands(ctx):
            entry = _index().get(name)
            described: CommandEntry | click.Command | None
            if name not in self.commands and entry is not None and entry.readable:
                described = entry
            else:
                described = self.get_command(ctx, name)
            if described is None or (isinstance(described, click.Command) and described.hidden):
                continue
            rows.append((name, described))
        if not rows:
            return
        limit = formatter.width - 6 - max(len(name) for name, _ in rows)
        lines = [
            (name, d.short_help_str(limit) if isinstance(d, CommandEntry) else d.get_short_help_str(limit))
            for name, d in rows
        ]
        with formatter.section("Commands"):
            formatter.write_dl(lines)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="surgery")
@click.option("-v", "--verbose", count=True, help="Log progress (INFO) and show tracebacks on errors; -vv logs DEBUG too.")
def cli(verbose: int) -> None:
    """Repair, attack and analyse the safety alignment of LLM checkpoints and LoRA adapters.

    Works directly on Hugging Face safetensors checkpoints and peft adapters,
    one tensor at a time. `surgery demo` shows everything on a built-in testbed.
    """
    _VERBOSE["level"] = verbose
    configure_logging(verbose)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI and map errors to exit codes (2 bad input, 1 internal)."""
    args = sys.argv[1:] if argv is None else argv
    sys.stdin = open(os.devnull, encoding="utf-8")  # stdin is never read: no library prompt can get an answer
    # SIGTERM unwinds like an exception, so atomic outputs remove their temporaries.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    _VERBOSE["level"] = sum(a.count("v") for a in args if a.startswith("-") and set(a[1:]) == {"v"})
    _VERBOSE["level"] += args.count("--verbose")
    configure_logging(_VERBOSE["level"])
    try:
        cli.main(args=args, prog_name="surgery", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:  # usage errors: click's own message, exit 2
        exc.show()
        sys.exit(exc.exit_code)
    except SurgeryError as exc:
        if _VERBOSE["level"]:
            traceback.print_exc()
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:
        message = environment_error_message(exc)
        if _VERBOSE["level"]:
            traceback.print_exc()
        if message is None:
            click.echo(f"internal error: {type(exc).__name__}: {exc} (run with -v for the traceback)", err=True)
            sys.exit(1)
        click.echo(f"error: {message}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence
        if _VERBOSE["level"]:
            traceback.print_exc()
        click.echo(f"internal error: {type(exc).__name__}: {exc} (run with -v for the traceback)", err=True)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
