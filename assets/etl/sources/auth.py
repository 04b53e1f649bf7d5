"""How a REST source authenticates: one `httpx.Auth` per kind, built from the spec by `open_auth`.

httpx's auth flow is a generator around each request, which is what OAuth2 needs: the token is
fetched lazily, kept until shortly before it expires, and fetched again once when the API answers
401 (a token revoked early), after which a second 401 is the API's answer. Secrets are read from the
environment variables the spec names and never appear in the spec, logs or errors: `secrets` lists
them for masking.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Generator

import httpx

from assets.etl.spec import (
    ApiKeyAuthSpec,
    BasicAuthSpec,
    BearerAuthSpec,
    OAuth2ClientCredentialsSpec,
)
from orchestration.errors import ConfigurationError, JunctionError

__all__ = ["AUTH_KINDS", "SourceAuth", "open_auth"]

# A token is renewed this many seconds before the expiry its server gave.
EXPIRY_MARGIN_S = 30.0


def _secret(name: str, field: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise ConfigurationError(f"environment variable {name} (the source's auth.{field}) is not set")
    return value


class SourceAuth(httpx.Auth):
    """An `httpx.Auth` that also tells which values must be masked wherever a URL or error is shown."""

    secrets: tuple[str, ...] = ()
    # Who asks, stable across a run's token renewals: part of a cached answer's key (hashed, never stored).
    credentials: tuple[str, ...] = ()


class BearerTokenAuth(SourceAuth):
    def __init__(self, spec: BearerAuthSpec):
        self.token = _secret(spec.token_env, "token_env")
        self.secrets = self.credentials = (self.token,)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.token}"
        yield request


class ApiKeyAuth(SourceAuth):
    def __init__(self, spec: ApiKeyAuthSpec):
        self.spec = spec
        self.key = _secret(spec.key_env, "key_env")
        self.secrets = self.credentials = (self.key,)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self.spec.location == "header":
            request.headers[self.spec.name] = self.key
        else:
            request.url = request.url.copy_merge_params({self.spec.name: self.key})
        yield request


class BasicAuth(SourceAuth):
    def __init__(self, spec: BasicAuthSpec):
        username = (
            spec.username if spec.username is not None else _secret(spec.username_env or "", "username_env")
        )
        password = _secret(spec.password_env, "password_env")
        self.inner = httpx.BasicAuth(username, password)
        self.secrets = (password,)
        self.credentials = (username, password)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        yield from self.inner.auth_flow(request)


class OAuth2ClientCredentials(SourceAuth):
    """RFC 6749 section 4.4: `grant_type=client_credentials` at the token endpoint."""

    requires_response_body = True

    def __init__(self, spec: OAuth2ClientCredentialsSpec, timeout_s: float = 30.0):
        self.spec = spec
        self.client_id = _secret(spec.client_id_env, "client_id_env")
        self.client_secret = _secret(spec.client_secret_env, "client_secret_env")
        self.secrets = (self.client_secret,)
        self.credentials = (spec.token_url, self.client_id, self.client_secret)
        self.timeout_s = timeout_s
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = threading.Lock()
        self.tokens_fetched = 0

    def _fetch(self) -> str:
        form = {"grant_type": "client_credentials"}
        if self.spec.scopes:
            form["scope"] = " ".join(self.spec.scopes)
        auth = None
        if self.spec.credentials_in == "basic":
            auth = httpx.BasicAuth(self.client_id, self.client_secret)
        else:
            form |= {"client_id": self.client_id, "client_secret": self.client_secret}
        try:
            response = httpx.post(self.spec.token_url, data=form, auth=auth, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise JunctionError(f"OAuth2 token request to {self.spec.token_url} failed: {exc}") from None
        if response.status_code != 200:
            raise JunctionError(
                f"OAuth2 token request to {self.spec.token_url} answered {response.status_code}: "
                f"{response.text[:200]}"
            )
        try:
            body = response.json()
            token = body["access_token"]
        except (ValueError, KeyError, TypeError):
            raise JunctionError(
                f"OAuth2 token answer of {self.spec.token_url} holds no access_token"
            ) from None
        expires_in = body.get("expires_in")
        lifetime = float(expires_in) if isinstance(expires_in, int | float) else 3600.0
        self._token, self._expires_at = token, time.monotonic() + max(lifetime - EXPIRY_MARGIN_S, 0.0)
        self.tokens_fetched += 1
        self.secrets = (self.client_secret, token)
        return token

    def token(self, *, renew: bool = False) -> str:
        with self._lock:
            if renew or self._token is None or time.monotonic() >= self._expires_at:
                return self._fetch()
            return self._token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        sent = self.token()
        request.headers["Authorization"] = f"Bearer {sent}"
        response = yield request
        if response.status_code == 401:
            request.headers["Authorization"] = f"Bearer {self._renewed(sent)}"
            yield request

    def _renewed(self, refused: str) -> str:
        """A token other than the `refused` one: fetched once, however many requests in flight were
        refused with it (another thread may have renewed it already)."""
        with self._lock:
            return self._fetch() if self._token == refused or self._token is None else self._token


AUTH_KINDS: dict[type, type[SourceAuth]] = {
    BearerAuthSpec: BearerTokenAuth,
    ApiKeyAuthSpec: ApiKeyAuth,
    BasicAuthSpec: BasicAuth,
    OAuth2ClientCredentialsSpec: OAuth2ClientCredentials,
}


def open_auth(
    spec: BearerAuthSpec | ApiKeyAuthSpec | BasicAuthSpec | OAuth2ClientCredentialsSpec | None,
) -> SourceAuth | None:
    """The auth of a REST source's spec (None: no auth); a missing secret is a configuration error."""
    return None if spec is None else AUTH_KINDS[type(spec)](spec)
