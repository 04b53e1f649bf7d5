"""Principals (who is calling), scopes (what they may do) and the API keys that authenticate them.

A principal is a named caller with groups: an API key's owner today, a JWT's `sub` later. Approvals,
the audit log and run tags refer to callers by their principal.

Scope grammar (`parse_scope`)
-----------------------------
A scope is `admin` or `area:action[:resource]`:

* `area` and `action` are lowercase words: a letter, then letters, digits, `_` or `-`;
* `resource` is a letter or digit, then letters, digits, `_`, `-`, `.` or `/` (case-sensitive: it names
  a stream, a pipeline, ...), or `*`;
* at most three parts, none empty, no whitespace; 200 characters at most.

What a granted scope covers:

* `admin` grants everything (and only `admin` grants `admin`);
* `area:action` grants that action on every resource: `events:publish` covers `events:publish:orders`;
  `area:action:*` means the same;
* `area:*` grants every action of the area on every resource (`*` as an action takes no resource);
* `area:action:resource` grants exactly that resource; there are no partial wildcards (`orders*`).

A required scope without a resource asks for the action on every resource, so a grant of
`events:publish:orders` does not satisfy `events:publish`: callers check the resource they act on.

API keys
--------
A key reads `jk_<id>_<secret>`: the id (16 hex digits) finds the row, the secret (256 random bits) is
compared with `hmac.compare_digest` against a salted SHA-256 stored in its place. The key itself is
shown once, at creation, and never stored.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from orchestration.errors import JunctionError
from orchestration.kernel.audit import AuditEvent, as_utc, run_audited
from orchestration.store.db import get_engine, session_scope
from orchestration.store.models import ApiKey

ADMIN_SCOPE = "admin"
WILDCARD = "*"
MAX_SCOPE_LENGTH = 200
KEY_PREFIX = "jk"
LOCAL_ADMIN_NAME = "local-admin"
LOCAL_ADMIN_CREATOR = "junction dev"
# `last_used_at` is a hint for humans ("is this key still in use?"), not an access log: writing it at
# most once a minute per key keeps authentication a read on the hot path.
LAST_USED_RESOLUTION = timedelta(minutes=1)

_WORD = re.compile(r"^[a-z][a-z0-9_-]*$")
_RESOURCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@\-]*$")
_TOKEN = re.compile(rf"^{KEY_PREFIX}_(?P<id>[0-9a-f]{{16}})_(?P<secret>[A-Za-z0-9_-]{{43}})$")


class ScopeError(JunctionError, ValueError):
    """A malformed scope. A ValueError for callers parsing input; a JunctionError for the CLI."""


class AuthenticationError(JunctionError):
    """The presented key does not authenticate anyone; `reason` says why (callers pick the HTTP code).

    Reasons: `malformed key`, `unknown key` (no such id, or a wrong secret: a caller without the
    secret learns nothing about which ids exist), `key revoked`, `key expired`.
    """

    def __init__(self, reason: str):
        super().__init__(f"authentication failed: {reason}")
        self.reason = reason


class ApiKeyError(JunctionError):
    """An API key cannot be created or revoked as asked (bad name, duplicate, unknown, ...)."""


class ApiKeyNotFound(ApiKeyError):
    """No key of that name."""


class ApiKeyConflict(ApiKeyError):
    """The name is taken, or the key is already revoked."""


@dataclass(frozen=True)
class Scope:
    """One parsed scope; `text` is what was granted, kept as written."""

    area: str
    action: str | None = None
    resource: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.area == ADMIN_SCOPE and self.action is None

    @property
    def all_resources(self) -> bool:
        return self.resource is None or self.resource == WILDCARD

    @property
    def text(self) -> str:
        return ":".join(part for part in (self.area, self.action, self.resource) if part is not None)

    def __str__(self) -> str:
        return self.text

    def covers(self, required: Scope) -> bool:
        """True if holding this scope grants `required` (see the module docstring for the rules)."""
        if self.is_admin:
            return True
        if required.is_admin or self.area != required.area:
            return False
        if self.action == WILDCARD:
            return True
        if required.action == WILDCARD or self.action != required.action:
            return False
        if self.all_resources:
            return True
        return not required.all_resources and self.resource == required.resource


def parse_scope(text: str) -> Scope:
    """Parse `admin` or `area:action[:resource]`, raising ScopeError (a ValueError) with the reason."""
    if not isinstance(text, str):
        raise ScopeError(f"a scope must be a string, not {type(text).__name__}")
    if text == ADMIN_SCOPE:
        return Scope(area=ADMIN_SCOPE)
    if not text:
        raise ScopeError("empty scope")
    if len(text) > MAX_SCOPE_LENGTH:
        raise ScopeError(f"scope longer than {MAX_SCOPE_LENGTH} characters")
    parts = text.split(":")
    if len(parts) == 1:
        raise ScopeError(f"invalid scope {text!r}: expected area:action[:resource] or admin")
    if len(parts) > 3:
        raise ScopeError(f"invalid scope {text!r}: too many parts (at most area:action:resource)")
    if any(part == "" for part in parts):
        raise ScopeError(f"invalid scope {text!r}: empty part")
    area, action, *rest = parts
    resource = rest[0] if rest else None
    if area == ADMIN_SCOPE:
        raise ScopeError(f"invalid scope {text!r}: admin takes no action or resource")
    if not _WORD.match(area):
        raise ScopeError(
            f"invalid scope {text!r}: area {area!r} must be lowercase letters, digits, '_' or '-', "
            "starting with a letter"
        )
    if action != WILDCARD and not _WORD.match(action):
        raise ScopeError(
            f"invalid scope {text!r}: action {action!r} must be lowercase letters, digits, '_' or '-', "
            "starting with a letter (or *)"
        )
    if resource is not None:
        if action == WILDCARD:
            raise ScopeError(f"invalid scope {text!r}: a wildcard action takes no resource")
        if resource != WILDCARD and not _RESOURCE.match(resource):
            raise ScopeError(
                f"invalid scope {text!r}: resource {resource!r} may hold letters, digits, '_', '-', '.' "
                "or '/' (or be *)"
            )
    return Scope(area=area, action=action, resource=resource)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: who (`name`), in which groups, allowed what, and how it was established."""

    name: str
    groups: frozenset[str]
    scopes: tuple[Scope, ...]
    via: str

    def allows(self, required_scope: str) -> bool:
        """True if any granted scope covers `required_scope` (which must itself be well-formed)."""
        required = parse_scope(required_scope)
        return any(granted.covers(required) for granted in self.scopes)


@dataclass(frozen=True)
class ApiKeyInfo:
    """An API key as listed: everything but the secret and its hash."""

    id: str
    name: str
    principal: str
    scopes: tuple[str, ...]
    groups: tuple[str, ...]
    created_at: datetime
    created_by: str
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or datetime.now(UTC))

    def usable(self, now: datetime | None = None) -> bool:
        return not self.revoked and not self.expired(now)

    def to_json(self) -> dict[str, Any]:
        def moment(value: datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {
            "id": self.id,
            "name": self.name,
            "principal": self.principal,
            "scopes": list(self.scopes),
            "groups": list(self.groups),
            "created_at": moment(self.created_at),
            "created_by": self.created_by,
            "expires_at": moment(self.expires_at),
            "revoked_at": moment(self.revoked_at),
            "last_used_at": moment(self.last_used_at),
        }


def _info(row: ApiKey) -> ApiKeyInfo:
    return ApiKeyInfo(
        id=row.id,
        name=row.name,
        principal=row.principal,
        scopes=tuple(row.scopes),
        groups=tuple(row.groups),
        created_at=row.created_at,
        created_by=row.created_by,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
    )


def hash_secret(salt: str, secret: str) -> str:
    """Salted SHA-256 of a key's secret.

    The secret is 256 random bits, so guessing it is infeasible however fast the hash is: a slow
    password hash (bcrypt, scrypt, argon2) protects low-entropy human passwords and would only add
    tens of milliseconds to every authenticated request. The salt keeps equal secrets (there are
    none in practice) and precomputed tables from lining up across rows and deployments.
    """
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode("ascii")).hexdigest()


def _check_name(kind: str, value: str) -> str:
    if not value or len(value) > 200 or not _NAME.match(value):
        raise ApiKeyError(
            f"invalid {kind} {value!r}: use letters, digits, '_', '-', '.' or '@' (starting with a letter "
            "or digit, at most 200 characters)"
        )
    return value


def create_api_key(
    name: str,
    *,
    scopes: Iterable[str],
    principal: str | None = None,
    groups: Iterable[str] = (),
    expires_at: datetime | None = None,
    created_by: str = "cli",
    origin: str = "cli",
    engine: Engine | None = None,
) -> tuple[ApiKeyInfo, str]:
    """Create a key and return (its info, the key). The key is not stored and cannot be shown again.

    The creation and its audit entry (`api_key.create`, by `created_by`) commit together.
    """
    _check_name("key name", name)
    principal = _check_name("principal", principal or name)
    group_list = sorted({_check_name("group", group) for group in groups})
    scope_list = list(dict.fromkeys(parse_scope(scope).text for scope in scopes))
    if not scope_list:
        raise ApiKeyError("an API key needs at least one scope")
    now = datetime.now(UTC)
    if expires_at is not None:
        expires_at = as_utc(expires_at)
        if expires_at <= now:
            raise ApiKeyError(f"expiry {expires_at.isoformat()} is in the past")

    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)  # 32 bytes = 256 bits, 43 URL-safe characters
    salt = secrets.token_hex(16)

    def insert(session: Session) -> tuple[ApiKeyInfo, AuditEvent]:
        if session.scalar(select(ApiKey.id).where(ApiKey.name == name)) is not None:
            raise ApiKeyConflict(f"an API key named {name!r} already exists (names are never reused)")
        row = ApiKey(
            id=key_id,
            name=name,
            principal=principal,
            groups=group_list,
            scopes=scope_list,
            salt=salt,
            secret_hash=hash_secret(salt, secret),
            created_at=now,
            created_by=created_by,
            expires_at=expires_at,
        )
        session.add(row)
        session.flush()
        event = AuditEvent(
            action="api_key.create",
            actor=created_by,
            target=f"api_key:{name}",
            origin=origin,
            details={
                "key_id": key_id,
                "principal": principal,
                "scopes": scope_list,
                "groups": group_list,
                "expires_at": expires_at.isoformat() if expires_at else None,
            },
        )
        return _info(row), event

    try:
        info, _ = run_audited(insert, engine=engine)
    except IntegrityError:
        # Two creators raced on the same name: the UNIQUE name decided.
        raise ApiKeyConflict(f"an API key named {name!r} already exists (names are never reused)") from None
    return info, f"{KEY_PREFIX}_{key_id}_{secret}"


def authenticate(token: str, *, engine: Engine | None = None, now: datetime | None = None) -> Principal:
    """The principal a key stands for, or AuthenticationError with the reason."""
    match = _TOKEN.match(token.strip()) if isinstance(token, str) else None
    if match is None:
        raise AuthenticationError("malformed key")
    engine = engine or get_engine()
    now = as_utc(now) if now is not None else datetime.now(UTC)
    with session_scope(engine) as session:
        row = session.get(ApiKey, match.group("id"))
        if row is None:
            # Hash anyway so that an unknown id and a wrong secret take the same time.
            hmac.compare_digest(hash_secret("00" * 16, match.group("secret")), "0" * 64)
            raise AuthenticationError("unknown key")
        if not hmac.compare_digest(hash_secret(row.salt, match.group("secret")), row.secret_hash):
            raise AuthenticationError("unknown key")
        info = _info(row)
    if info.revoked:
        raise AuthenticationError("key revoked")
    if info.expired(now):
        raise AuthenticationError("key expired")
    if info.last_used_at is None or now - info.last_used_at >= LAST_USED_RESOLUTION:
        _touch(engine, info.id, now)
    return Principal(
        name=info.principal,
        groups=frozenset(info.groups),
        scopes=tuple(parse_scope(scope) for scope in info.scopes),
        via=f"api_key:{info.name}",
    )


def _touch(engine: Engine, key_id: str, now: datetime) -> None:
    """Record use; the condition makes concurrent requests of the same minute write once."""
    cutoff = now - LAST_USED_RESOLUTION
    with session_scope(engine) as session:
        session.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id)
            .where((ApiKey.last_used_at.is_(None)) | (ApiKey.last_used_at <= cutoff))
            .values(last_used_at=now)
        )


def get_api_key(name: str, *, engine: Engine | None = None) -> ApiKeyInfo | None:
    with session_scope(engine) as session:
        row = session.scalar(select(ApiKey).where(ApiKey.name == name))
        return _info(row) if row is not None else None


def list_api_keys(engine: Engine | None = None, include_revoked: bool = False) -> list[ApiKeyInfo]:
    """Keys in creation order; revoked ones only with `include_revoked` (expired ones always)."""
    statement = select(ApiKey).order_by(ApiKey.created_at, ApiKey.name)
    if not include_revoked:
        statement = statement.where(ApiKey.revoked_at.is_(None))
    with session_scope(engine) as session:
        return [_info(row) for row in session.scalars(statement)]


def revoke_api_key(name: str, *, actor: str, origin: str = "cli", engine: Engine | None = None) -> ApiKeyInfo:
    """Revoke a key for good (audited as `api_key.revoke` by `actor`); its name stays taken."""

    def revoke(session: Session) -> tuple[ApiKeyInfo, AuditEvent]:
        row = session.scalar(select(ApiKey).where(ApiKey.name == name))
        if row is None:
            raise ApiKeyNotFound(f"no API key named {name!r}")
        if row.revoked_at is not None:
            raise ApiKeyConflict(f"API key {name!r} was already revoked at {row.revoked_at.isoformat()}")
        row.revoked_at = datetime.now(UTC)
        session.flush()
        event = AuditEvent(
            action="api_key.revoke",
            actor=actor,
            target=f"api_key:{name}",
            origin=origin,
            details={"key_id": row.id, "principal": row.principal},
        )
        return _info(row), event

    info, _ = run_audited(revoke, engine=engine)
    return info


def _read_key_file(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def _usable_admin_key(token: str, engine: Engine) -> ApiKeyInfo | None:
    """The key's info if `token` authenticates an admin-scoped key, else None."""
    try:
        principal = authenticate(token, engine=engine)
    except AuthenticationError:
        return None
    if not principal.allows(ADMIN_SCOPE):
        return None
    key_id = _TOKEN.match(token.strip()).group("id")
    with session_scope(engine) as session:
        return _info(session.get(ApiKey, key_id))


def _write_secret_file(path: Path, token: str) -> None:
    """Write `token` to `path` with mode 0600, atomically (never a half-written or world-readable file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # created 0600
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(token + "\n")
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# The environment variable `junction dev` exports the local admin key in, for the processes it starts.
LOCAL_ADMIN_KEY_ENV = "JUNCTION_LOCAL_ADMIN_KEY"


def export_local_admin_key(path: Path) -> None:
    """JUNCTION_LOCAL_ADMIN_KEY from the local admin key file, unless set or there is no file: pipelines
    that read the platform's own API (assets/pipelines/platform_audit.yaml) name it as their token."""
    if LOCAL_ADMIN_KEY_ENV not in os.environ and path.is_file():
        os.environ[LOCAL_ADMIN_KEY_ENV] = path.read_text().strip()


def ensure_local_admin_key(path: Path, *, engine: Engine | None = None) -> tuple[ApiKeyInfo, bool]:
    """Make sure `path` holds a usable admin key for the local platform; return (info, created).

    Used by `junction dev` on start. A usable key in the file is kept. Otherwise (no file, or its key
    is unknown, revoked, expired or not admin) the previous local admin keys `junction dev` made are
    revoked, since nobody holds their secret any more, and a new `admin` key is created under the
    first free name of `local-admin`, `local-admin-2`, ... (names are never reused).
    """
    engine = engine or get_engine()
    path = Path(path)
    token = _read_key_file(path)
    if token is not None:
        info = _usable_admin_key(token, engine)
        if info is not None:
            return info, False

    existing = list_api_keys(engine, include_revoked=True)
    local_admin_name = re.compile(rf"^{re.escape(LOCAL_ADMIN_NAME)}(-\d+)?$")
    for key in existing:
        if local_admin_name.match(key.name) and key.created_by == LOCAL_ADMIN_CREATOR and not key.revoked:
            revoke_api_key(key.name, actor=LOCAL_ADMIN_CREATOR, origin="cli", engine=engine)
    taken = {key.name for key in existing}
    name = LOCAL_ADMIN_NAME
    suffix = 1
    while name in taken:
        suffix += 1
        name = f"{LOCAL_ADMIN_NAME}-{suffix}"
    info, token = create_api_key(
        name,
        scopes=[ADMIN_SCOPE],
        principal=LOCAL_ADMIN_NAME,
        created_by=LOCAL_ADMIN_CREATOR,
        origin="cli",
        engine=engine,
    )
    _write_secret_file(path, token)
    return info, True
