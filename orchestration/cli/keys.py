"""`junction keys`: create, list and revoke the API keys callers authenticate with."""

from __future__ import annotations

import getpass
import json
from datetime import UTC, datetime

import click

from orchestration.cli.common import render_table
from orchestration.kernel.times import parse_duration, parse_instant


def cli_actor() -> str:
    """Who runs the command, for the audit log: the OS user (`cli` if the system cannot tell)."""
    try:
        return getpass.getuser() or "cli"
    except (KeyError, OSError):
        return "cli"


def parse_expiry(text: str, now: datetime | None = None) -> datetime:
    """`--expires`: a duration from now (`30d`, `12h`, `2w`) or an ISO date-time (naive is UTC)."""
    now = now or datetime.now(UTC)
    duration = parse_duration(text)
    if duration is not None:
        return now + duration
    moment = parse_instant(text)
    if moment is None:
        raise click.BadParameter(
            f"{text!r} is neither a duration (90m, 12h, 30d, 2w) nor an ISO date-time (2027-01-01T00:00Z)",
            param_hint="--expires",
        )
    return moment


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M") if moment else "-"


@click.group()
def keys() -> None:
    """API keys: `jk_<id>_<secret>` tokens carrying a principal, groups and scopes."""
    from orchestration.store.bootstrap import migrate_store

    migrate_store()  # a new JUNCTION_HOME has no tables yet: keys can be made before the first start


@keys.command()
@click.argument("name")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    required=True,
    help="A granted scope, repeatable: admin, or area:action[:resource] (runs:launch, events:publish:orders).",
)
@click.option("--group", "groups", multiple=True, help="A group the principal belongs to, repeatable.")
@click.option("--principal", help="Who the key stands for (approvals, audit, run tags). Default: NAME.")
@click.option(
    "--expires", help="Expiry: a duration from now (30d, 12h, 2w) or an ISO date-time. Default: never."
)
def create(
    name: str, scopes: tuple[str, ...], groups: tuple[str, ...], principal: str | None, expires: str | None
) -> None:
    """Create key NAME and print it once (only a salted hash of it is stored)."""
    from orchestration.kernel.principals import create_api_key

    expires_at = parse_expiry(expires) if expires else None
    info, token = create_api_key(
        name,
        scopes=[scope.strip() for scope in scopes],
        principal=principal,
        groups=groups,
        expires_at=expires_at,
        created_by=cli_actor(),
        origin="cli",
    )
    click.echo(
        f"created API key {info.name} (principal {info.principal}, scopes {', '.join(info.scopes)}"
        + (f", groups {', '.join(info.groups)}" if info.groups else "")
        + (f", expires {info.expires_at.isoformat()}" if info.expires_at else "")
        + ")",
        err=True,
    )
    click.echo(token)
    click.secho("Store this key now: it is not shown again.", err=True, fg="yellow")


@keys.command(name="list")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked keys.")
@click.option("--json", "as_json", is_flag=True, help="A JSON array instead of a table.")
def list_keys(include_revoked: bool, as_json: bool) -> None:
    """List keys (never their secrets)."""
    from orchestration.kernel.principals import list_api_keys

    infos = list_api_keys(include_revoked=include_revoked)
    if as_json:
        click.echo(json.dumps([info.to_json() for info in infos], indent=2))
        return
    if not infos:
        click.echo("no API keys" + ("" if include_revoked else " (--all includes revoked ones)"))
        return
    now = datetime.now(UTC)
    rows = [
        (
            info.name,
            info.principal,
            ",".join(info.scopes),
            ",".join(info.groups) or "-",
            _when(info.created_at),
            _when(info.expires_at) + (" (expired)" if info.expired(now) else ""),
            _when(info.revoked_at),
            _when(info.last_used_at),
        )
        for info in infos
    ]
    headers = ("NAME", "PRINCIPAL", "SCOPES", "GROUPS", "CREATED", "EXPIRES", "REVOKED", "LAST USED")
    click.echo(render_table(headers, rows))


@keys.command()
@click.argument("name")
def revoke(name: str) -> None:
    """Revoke key NAME for good (its name is not reused)."""
    from orchestration.kernel.principals import revoke_api_key

    info = revoke_api_key(name, actor=cli_actor(), origin="cli")
    click.echo(f"revoked API key {info.name} (principal {info.principal})")
