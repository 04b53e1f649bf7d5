"""Who is calling and what they may do: API keys (kernel principals) and, optionally, JWTs.

`Authorization: Bearer <token>` or `X-API-Key: <key>`. A token shaped like a JWT (three dot-separated
parts) is validated as a JWT when JWT auth is configured (`JUNCTION_JWT_ISSUER` plus an HS256 secret
or an RS256 public key); everything else is looked up as an API key. Missing or bad credentials
answer 401, a missing scope 403 — both as problem documents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import anyio
from fastapi import Depends, Query, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from orchestration.gateway.problems import ProblemError
from orchestration.kernel.principals import (
    AuthenticationError,
    Principal,
    ScopeError,
    authenticate,
    parse_scope,
)
from orchestration.settings import JunctionSettings

ANONYMOUS = Principal(name="anonymous", groups=frozenset(), scopes=(), via="public-read")
# Who a request holding a valid signed link is (it has no scopes: the link is its only authority).
SIGNED_LINK = Principal(name="signed-link", groups=frozenset(), scopes=(), via="signed-link")

bearer_scheme = HTTPBearer(auto_error=False, description="An API key (jk_...) or, if configured, a JWT.")
api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key (jk_...).")


def unauthorized(reason: str) -> ProblemError:
    return ProblemError(
        401, reason, title="Unauthorized", slug="unauthorized", headers={"WWW-Authenticate": "Bearer"}
    )


@dataclass(frozen=True)
class JwtVerifier:
    issuer: str
    audience: str | None
    keys: dict[str, object]  # algorithm -> key
    groups_claim: str
    scopes_claim: str

    @classmethod
    def from_settings(cls, settings: JunctionSettings) -> JwtVerifier | None:
        import os

        if not settings.jwt_issuer:
            return None
        keys: dict[str, object] = {}
        if settings.jwt_secret_env:
            secret = os.environ.get(settings.jwt_secret_env)
            if not secret:
                from orchestration.errors import ConfigurationError

                raise ConfigurationError(
                    f"JUNCTION_JWT_SECRET_ENV names {settings.jwt_secret_env}, which is not set"
                )
            keys["HS256"] = secret
        if settings.jwt_public_key_file:
            keys["RS256"] = settings.jwt_public_key_file.read_text()
        if not keys:
            from orchestration.errors import ConfigurationError

            raise ConfigurationError(
                "JUNCTION_JWT_ISSUER is set but neither JUNCTION_JWT_SECRET_ENV nor a public key"
            )
        return cls(
            settings.jwt_issuer,
            settings.jwt_audience,
            keys,
            settings.jwt_groups_claim,
            settings.jwt_scopes_claim,
        )

    def principal(self, token: str) -> Principal:
        import jwt

        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError as exc:
            raise unauthorized(f"malformed token: {exc}") from None
        key = self.keys.get(algorithm)
        if key is None:
            raise unauthorized(f"token algorithm {algorithm!r} is not accepted")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=self.issuer,
                audience=self.audience,
                options={"require": ["exp", "iss", "sub"], "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise unauthorized("token expired") from None
        except jwt.PyJWTError as exc:
            raise unauthorized(f"invalid token: {exc}") from None
        raw_scopes = claims.get(self.scopes_claim, [])
        scope_texts = raw_scopes.split() if isinstance(raw_scopes, str) else list(raw_scopes)
        groups = claims.get(self.groups_claim, [])
        try:
            scopes = tuple(parse_scope(text) for text in scope_texts)
        except ScopeError as exc:
            raise unauthorized(f"token carries a malformed scope: {exc}") from None
        return Principal(
            name=str(claims["sub"]),
            groups=frozenset(str(g) for g in (groups if isinstance(groups, list) else [groups])),
            scopes=scopes,
            via="jwt",
        )


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and not token.startswith("jk_")


async def current_principal(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
    api_key: Annotated[str | None, Security(api_key_scheme)],
) -> Principal | None:
    """The caller, or None when no credentials were sent."""
    token = bearer.credentials if bearer else api_key
    if not token:
        return None
    return await principal_for_token(request.app, token)


async def principal_for_token(app, token: str) -> Principal:
    """Who `token` is: a JWT (when configured), a stream token (`jst_`, WebSocket subscriptions from
    browsers) or an API key; else a 401 problem."""
    verifier: JwtVerifier | None = app.state.jwt_verifier
    if token.startswith(STREAM_TOKEN_PREFIX):
        return stream_token_principal(token, app.state.settings)
    if verifier is not None and looks_like_jwt(token):
        return verifier.principal(token)
    try:
        return await anyio.to_thread.run_sync(authenticate, token)
    except AuthenticationError as exc:
        raise unauthorized(exc.reason) from None


# Short-lived tokens for WebSocket and SSE connections from browsers, which cannot set headers: a
# signed copy of the minting principal (or of a narrower set of its scopes), valid for connecting
# within `max_age_s` of its issue.
STREAM_TOKEN_PREFIX = "jst_"
STREAM_TOKEN_PURPOSE = "stream-connect"


def mint_stream_token(principal: Principal, scopes: tuple[str, ...], settings: JunctionSettings) -> str:
    from orchestration.kernel.signed_links import sign

    payload = {"name": principal.name, "groups": sorted(principal.groups), "scopes": list(scopes)}
    return STREAM_TOKEN_PREFIX + sign(STREAM_TOKEN_PURPOSE, payload, settings=settings)


def stream_token_principal(token: str, settings: JunctionSettings) -> Principal:
    from orchestration.kernel.signed_links import InvalidLink, verify

    try:
        payload = verify(
            STREAM_TOKEN_PURPOSE,
            token.removeprefix(STREAM_TOKEN_PREFIX),
            max_age_s=settings.live_token_ttl_s,
            settings=settings,
        )
        scopes = tuple(parse_scope(text) for text in payload["scopes"])
        return Principal(
            name=str(payload["name"]), groups=frozenset(payload["groups"]), scopes=scopes, via="stream-token"
        )
    except InvalidLink as exc:
        raise unauthorized(f"stream token: {exc.reason}") from None
    except (KeyError, TypeError, ScopeError):
        raise unauthorized("stream token: not valid") from None


def requires(scope_template: str, *, read_only: bool = False):
    """A dependency granting access to callers whose scopes cover `scope_template`.

    The template may name path parameters (`events:publish:{name}`). Read-only endpoints are open
    without credentials when `JUNCTION_GATEWAY_PUBLIC_READ` is on; mutating ones never are.
    """

    async def dependency(
        request: Request, principal: Annotated[Principal | None, Depends(current_principal)]
    ) -> Principal:
        return _authorize(request, principal, scope_template, read_only)

    dependency.__name__ = f"requires_{_dependency_suffix(scope_template)}"
    return dependency


def _dependency_suffix(scope_template: str) -> str:
    return scope_template.replace(":", "_").replace("{", "").replace("}", "")


def _authorize(
    request: Request, principal: Principal | None, scope_template: str, read_only: bool
) -> Principal:
    if principal is None:
        if read_only and request.app.state.settings.gateway_public_read:
            request.state.principal_name = ANONYMOUS.name
            return ANONYMOUS
        raise unauthorized("send an API key as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    request.state.principal_name = principal.name  # for the request statistics
    required = scope_template.format(**request.path_params)
    try:
        allowed = principal.allows(required)
    except ScopeError:
        # A path parameter that cannot be a scope resource cannot name anything that exists.
        raise ProblemError(
            404, f"no such resource: {required.rsplit(':', 1)[-1]!r}", slug="not-found"
        ) from None
    if not allowed:
        raise ProblemError(
            403, f"this operation needs the scope '{required}'", title="Forbidden", slug="forbidden"
        )
    return principal


def requires_or_stream_token(scope_template: str):
    """Like `requires(scope_template, read_only=True)`, or a stream token (`mint_stream_token`) in a
    `token` query parameter: a browser's EventSource cannot send headers."""

    async def dependency(
        request: Request,
        principal: Annotated[Principal | None, Depends(current_principal)],
        token: Annotated[
            str | None,
            Query(max_length=4096, description="A stream token from POST /v1/streams/tokens."),
        ] = None,
    ) -> Principal:
        if principal is None and token:
            if not token.startswith(STREAM_TOKEN_PREFIX):
                raise unauthorized("?token= takes a stream token (POST /v1/streams/tokens), not a key")
            principal = stream_token_principal(token, request.app.state.settings)
        return _authorize(request, principal, scope_template, True)

    dependency.__name__ = f"requires_{_dependency_suffix(scope_template)}_or_stream_token"
    return dependency


def requires_or_signed_link(scope_template: str, purpose: str, claims: dict[str, str]):
    """Like `requires(scope_template, read_only=True)`, or a `token` query parameter signed for
    `purpose` (`kernel/signed_links.sign_permanent`) whose payload is exactly `claims` (claim name ->
    the path parameter giving its value): a link from the Dagster UI opened in a browser, which
    carries no API key.

    A key, when sent, is judged as usual and the token ignored. A forged or altered token answers 401,
    a genuine token for another resource 403.
    """

    async def dependency(
        request: Request,
        principal: Annotated[Principal | None, Depends(current_principal)],
        token: Annotated[
            str | None,
            Query(max_length=2048, description="A signed link token (in links the platform issued)."),
        ] = None,
    ) -> Principal:
        if principal is not None or not token:
            return _authorize(request, principal, scope_template, True)
        from orchestration.kernel.signed_links import InvalidLink, verify_permanent

        try:
            payload = verify_permanent(purpose, token, settings=request.app.state.settings)
        except InvalidLink as exc:
            raise unauthorized(exc.reason) from None
        wanted = {claim: request.path_params.get(parameter) for claim, parameter in claims.items()}
        if payload != wanted:
            raise ProblemError(403, "this link is for another resource", title="Forbidden", slug="forbidden")
        request.state.principal_name = SIGNED_LINK.name
        return SIGNED_LINK

    dependency.__name__ = f"requires_{_dependency_suffix(scope_template)}_or_signed_link"
    return dependency
