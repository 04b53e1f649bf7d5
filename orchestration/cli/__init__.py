"""The `junction` command line. Subcommands are imported only when used, so `--help` stays fast."""

from __future__ import annotations

import importlib
import sys

import click

from orchestration import __version__

# name -> "module:attribute". Later features add their command groups (plural nouns) here.
COMMANDS = {
    "dev": "orchestration.cli.server:dev",
    "gateway": "orchestration.cli.server:gateway",
    "db": "orchestration.cli.db:db",
    "keys": "orchestration.cli.keys:keys",
    "audit": "orchestration.cli.audit:audit",
    "backup": "orchestration.cli.backup:backup",
    "pipelines": "orchestration.cli.pipelines:pipelines",
    "events": "orchestration.cli.events:events",
    "workflows": "orchestration.cli.workflows:workflows",
    "approvals": "orchestration.cli.approvals:approvals",
    "notifications": "orchestration.cli.notifications:notifications",
    "cache": "orchestration.cli.cache:cache",
    "alerts": "orchestration.cli.alerts:alerts",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        return getattr(importlib.import_module(module_name), attribute)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="junction")
def cli() -> None:
    """Junction: an integration platform built on Dagster.

    Settings come from JUNCTION_* environment variables (see the README).
    """


def render_error(exc: BaseException) -> str:
    """One line for the user: what went wrong and, where known, where."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        problems = "; ".join(
            f"JUNCTION_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()
        )
        return f"invalid setting: {problems}"
    return str(exc) or exc.__class__.__name__


def main(argv: list[str] | None = None) -> None:
    from pydantic import ValidationError

    from orchestration.errors import JunctionError

    try:
        cli.main(args=argv, prog_name="junction", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (JunctionError, ValidationError) as exc:
        click.secho(f"Error: {render_error(exc)}", err=True, fg="red")
        sys.exit(getattr(exc, "exit_code", 2))
    sys.exit(0)
