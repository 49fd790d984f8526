"""The `nuclei-app` command line: a thin typer layer over library functions.

Each subcommand parses options, calls one library function a user could import,
and maps `NucleiAppError` to a one-line message plus the documented exit code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from nuclei_app import __version__
from nuclei_app.errors import ExitCode, NucleiAppError

app = typer.Typer(
    name="nuclei-app",
    help="Learn to segment overlapping nuclei in multiplex IF slides with no human annotation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"nuclei-app {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """nuclei-app: de novo nuclei segmentation with self-diagnosis."""


@app.command("schemas")
def schemas_command(
    output_dir: Path = typer.Option(..., "-o", "--output-dir", help="Folder to write every JSON Schema into."),
) -> None:
    """Export every JSON Schema the app writes or reads."""
    from nuclei_app.schemas import export_schemas

    for path in export_schemas(output_dir):
        typer.echo(str(path))


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the typer app, turning user errors into one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        app(args=args, prog_name="nuclei-app", standalone_mode=False)
    except NucleiAppError as error:
        typer.echo(f"nuclei-app: error: {error}", err=True)
        return int(error.exit_code)
    except typer.Exit as done:
        return int(done.exit_code)
    except typer.Abort:
        typer.echo("nuclei-app: aborted", err=True)
        return int(ExitCode.FAILURE)
    except KeyboardInterrupt:
        typer.echo("nuclei-app: interrupted", err=True)
        return 130
    except typer.TyperException as usage_problem:  # bad options or arguments
        if str(usage_problem):  # an empty message means help was already shown
            typer.echo(f"nuclei-app: usage error: {usage_problem}; see 'nuclei-app --help'", err=True)
        return int(ExitCode.USAGE)
    return int(ExitCode.OK)


if __name__ == "__main__":
    sys.exit(main())
