"""Entry point of the `surgery` command.

Commands live in `surgery.cli.<name>_cmd` modules; each exposes `COMMANDS`, a list
of click commands or groups. The modules are found by name and imported only when
their command runs (or for `--help`), so `surgery merge` does not pay for triton and
the methods. Errors: a `SurgeryError` prints one line and exits 2, and so does an
OSError the environment causes (read-only file system, full disk or quota, no
permission); any other exception exits 1 (with the traceback under `-v`).
"""

from __future__ import annotations

import errno
import importlib
import os
import pkgutil
import signal
import sys
import traceback

import click

from surgery import __version__
from surgery.errors import SurgeryError

_VERBOSE = {"level": 0}

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
    return f"{where}{exc.strerror or errno.errorcode.get(exc.errno, '')}; {hint}"


def _command_modules() -> dict[str, str]:
    """Command name -> module. A module `x_cmd` is assumed to define command `x` unless it
    says otherwise in `COMMAND_NAMES` (read from source text, so nothing is imported)."""
    import surgery.cli as package

    found: dict[str, str] = {}
    for module_info in pkgutil.iter_modules(package.__path__):
        if module_info.name.endswith("_cmd"):
            found[module_info.name.removesuffix("_cmd")] = f"surgery.cli.{module_info.name}"
    return found


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(_command_modules()))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is not None:
            return command
        module_name = _command_modules().get(name)
        if module_name is None:
            return None
        module = importlib.import_module(module_name)
        for candidate in getattr(module, "COMMANDS", []):
            self.add_command(candidate)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="surgery")
@click.option("-v", "--verbose", count=True, help="Show tracebacks on errors (and more logging with -vv).")
def cli(verbose: int) -> None:
    """Repair, attack and analyse the safety alignment of LLM checkpoints and LoRA adapters.

    Works directly on Hugging Face safetensors checkpoints and peft adapters,
    one tensor at a time. `surgery demo` shows everything on a built-in testbed.
    """
    _VERBOSE["level"] = verbose


def main(argv: list[str] | None = None) -> None:
    """Run the CLI and map errors to exit codes (2 bad input, 1 internal)."""
    args = sys.argv[1:] if argv is None else argv
    sys.stdin = open(os.devnull, encoding="utf-8")  # stdin is never read: no library prompt can get an answer
    # SIGTERM unwinds like an exception, so atomic outputs remove their temporaries.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    _VERBOSE["level"] = sum(a.count("v") for a in args if a.startswith("-") and set(a[1:]) == {"v"})
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
