"""The `dsv3` Typer root: wires one module per subcommand and is the single place that turns
errors into exit codes.

Command modules import torch lazily (inside the command), so `dsv3 --help` and
`dsv3 estimate-cost` start without it.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from typing import Annotated, Callable

import typer

from . import __version__
from .commands import download, estimate_cost, generate, profile_experts, quantize, tiny, verify
from .errors import DsvError

app = typer.Typer(
    name="dsv3",
    help="Toolkit for DeepSeek-V3-architecture models: download, quantize, generate (MTP), "
    "profile experts, estimate cost.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _debug() -> bool:
    return os.environ.get("DSV3_DEBUG") == "1"


def _report(message: str, code: int) -> typer.Exit:
    if _debug():
        traceback.print_exc()
    print(f"Error: {message}", file=sys.stderr)
    return typer.Exit(code)


def boundary(fn: Callable) -> Callable:
    """Run a command; bad input (DsvError) becomes one line on stderr and its exit code."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if sys.stdout is None:  # started with stdout closed (>&-): results would vanish or crash
            raise _report("stdout is closed; redirect it instead (> out.txt, or > /dev/null to drop the results)", 1)
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except DsvError as e:
            raise _report(str(e), e.exit_code) from None
        except KeyboardInterrupt:
            raise _report("interrupted", 130) from None
        except BrokenPipeError:
            raise typer.Exit(1) from None
        except (FileExistsError, NotADirectoryError) as e:  # a file where a folder should be
            raise _report(f"{e.filename}: a file is in the way of a folder this command writes; move it or choose "
                          "another path", 1) from None
        except OSError as e:
            # Disk full, permissions, missing files: the OS message names the path.
            raise _report(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}", 1) from None
        except Exception as e:  # noqa: BLE001 - the boundary: anything else is our bug, still one line
            hint = "" if _debug() else " (set DSV3_DEBUG=1 for a traceback)"
            raise _report(f"internal error: {type(e).__name__}: {e}{hint}", 1) from None

    return run


for _module in (download, quantize, generate, profile_experts, estimate_cost, tiny, verify):
    app.command(name=_module.NAME, help=_module.__doc__, no_args_is_help=getattr(_module, "NO_ARGS_IS_HELP", False))(
        boundary(_module.command)
    )


def _version(value: bool) -> None:
    if value:
        print(f"dsv3 {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


def main() -> None:
    """The `dsv3` entry point: Typer's own usage errors (an unknown option, a value out of range, a
    missing argument) become one `Error:` line and exit code 2, like the commands' own."""
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        print("Aborted.", file=sys.stderr)
        code = 1
    except typer.TyperException as e:
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        if message:  # empty when the command's help was shown instead (no arguments)
            print(f"Error: {message}", file=sys.stderr)
        code = getattr(e, "exit_code", 2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
