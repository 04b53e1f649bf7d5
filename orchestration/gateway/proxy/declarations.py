"""Who declares each route and upstream, and the one document the proxy compiles from them.

Every object has one owner, its `origin` (as streams have, `resources/event_stream/registry.py`):
- `yaml:<file>`: the routes file (setting JUNCTION_ROUTES_FILE) declares it; only the file changes it.
  The admin API answers 409 naming the file to a PUT or DELETE of it.
- `api`: the admin API (`PUT /gateway/v1/routes/{name}`, `/gateway/v1/upstreams/{name}`) declared it,
  kept in the platform store's `proxy_objects`. A file declaring it too never overwrites it: that
  reload is refused (a spec error naming the file and the object) and the running configuration stays.

Handing an object over is removing it from one owner and declaring it with the other (DELETE then an
edit of the file, or the other way round): no object is ever owned by both.

Routes of either owner may use upstreams of either owner. A write through the API is checked with the
file's objects (a route naming an unknown upstream is 422, deleting an upstream a route uses is 409),
in one store transaction; every gateway polls the store's revision with the file's stamp and reloads
when either changes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from sqlalchemy import Engine, func, select, text

from orchestration.gateway.proxy.config import RoutesFile, RouteSpec, UpstreamSpec
from orchestration.kernel.spec_errors import SpecError, SpecProblem, problems_from_validation

Kind = Literal["route", "upstream"]
API_ORIGIN = "api"
API_SOURCE = "the admin API (platform store)"
SECTIONS: dict[Kind, str] = {"route": "routes", "upstream": "upstreams"}
SPEC_MODELS: dict[Kind, type[BaseModel]] = {"route": RouteSpec, "upstream": UpstreamSpec}


def file_origin(path: str | Path) -> str:
    return f"yaml:{Path(path).name}"


class DeclaredInFile(Exception):
    """A write through the API to an object the routes file declares."""

    def __init__(self, kind: Kind, name: str, file: Path):
        self.kind, self.name, self.file = kind, name, file
        super().__init__(
            f"{kind} {name!r} is declared in the routes file {file} (origin {file_origin(file)!r}); "
            f"change it there (applied within seconds, no restart), or remove it from the file and "
            f"declare it through the API"
        )


class NotDeclared(Exception):
    def __init__(self, kind: Kind, name: str):
        self.kind, self.name = kind, name
        super().__init__(f"no {kind} named {name!r} is declared through the API")


@dataclass(frozen=True)
class Declarations:
    """The merged document and each object's owner, keyed by (kind, name)."""

    document: RoutesFile
    origins: dict[tuple[Kind, str], str]


def merge(from_file: RoutesFile, file: Path, from_api: dict[Kind, dict[str, Any]]) -> Declarations:
    """The file's objects and the API's (spec dicts as stored) as one checked document; SpecError
    naming, for each problem, the file or the API as where to fix it."""
    problems: list[SpecProblem] = []
    for kind, section in SECTIONS.items():
        for name in sorted(set(getattr(from_file, section)) & set(from_api[kind])):
            problems.append(
                SpecProblem(
                    f"{section}.{name}",
                    f"{kind} {name!r} is declared through the admin API (origin 'api'), which owns it; "
                    f"remove it from this file, or DELETE /gateway/v1/{section}/{name} and keep the file's",
                    str(file),
                )
            )
    if problems:
        raise SpecError(problems)
    origins: dict[tuple[Kind, str], str] = {}
    merged: dict[str, dict[str, Any]] = {}
    for kind, section in SECTIONS.items():
        merged[section] = dict(getattr(from_file, section))
        origins.update({(kind, name): file_origin(file) for name in merged[section]})
        for name, spec in from_api[kind].items():
            merged[section][name] = spec
            origins[(kind, name)] = API_ORIGIN
    try:
        document = RoutesFile.model_validate(merged)
    except ValidationError as exc:
        problems = problems_from_validation(exc)
    except SpecError as exc:
        problems = exc.problems
    else:
        return Declarations(document, origins)
    raise SpecError(_blamed(problem, origins, file) for problem in problems)


def _blamed(problem: SpecProblem, origins: dict[tuple[Kind, str], str], file: Path) -> SpecProblem:
    section, _, rest = problem.location.partition(".")
    name = rest.split(".")[0].split("[")[0]
    kind = "route" if section == "routes" else "upstream"
    source = API_SOURCE if origins.get((kind, name)) == API_ORIGIN else str(file)
    return replace(problem, file=source)


class ApiDeclarations:
    """The routes and upstreams the admin API owns, in the platform store."""

    def __init__(self, store_url: str):
        self.store_url = store_url

    @property
    def engine(self) -> Engine:
        from orchestration.store.db import get_engine

        return get_engine(self.store_url)

    def revision(self) -> tuple[int, float]:
        """Changes with every write (a delete lowers the count, a put raises the newest time)."""
        from orchestration.store.models import ProxyObject

        with self.engine.connect() as connection:
            count, newest = connection.execute(select(func.count(), func.max(ProxyObject.updated_at))).one()
        return count, newest or 0.0

    def objects(self, session: Any = None) -> dict[Kind, dict[str, Any]]:
        from orchestration.store.db import session_scope
        from orchestration.store.models import ProxyObject

        if session is None:
            with session_scope(self.engine) as session:
                return self.objects(session)
        found: dict[Kind, dict[str, Any]] = {"route": {}, "upstream": {}}
        for row in session.scalars(select(ProxyObject)):
            found[row.kind][row.name] = row.spec
        return found

    def put(
        self, kind: Kind, name: str, spec: BaseModel, actor: str, from_file: RoutesFile, file: Path
    ) -> bool:
        """Declare or replace an API object (checked with every other object first); whether it is
        new. DeclaredInFile, or SpecError when it does not fit the others."""
        if name in getattr(from_file, SECTIONS[kind]):
            raise DeclaredInFile(kind, name, file)
        stored = spec.model_dump(mode="json", exclude_unset=True)
        return self._write(kind, name, stored, actor, from_file, file)

    def delete(self, kind: Kind, name: str, from_file: RoutesFile, file: Path) -> None:
        """Remove an API object; DeclaredInFile, NotDeclared, or SpecError when others still use it."""
        if name in getattr(from_file, SECTIONS[kind]):
            raise DeclaredInFile(kind, name, file)
        self._write(kind, name, None, "", from_file, file)

    def _write(
        self, kind: Kind, name: str, stored: dict | None, actor: str, from_file: RoutesFile, file: Path
    ) -> bool:
        """Whether the object is new; the merged declarations are checked before anything is written."""
        from orchestration.store.db import session_scope
        from orchestration.store.models import ProxyObject

        with session_scope(self.engine, write_lock=True) as session:
            if session.bind.dialect.name == "postgresql":  # one writer at a time across gateways
                session.execute(text("LOCK TABLE proxy_objects IN SHARE ROW EXCLUSIVE MODE"))
            objects = self.objects(session)
            new = name not in objects[kind]
            if stored is None:
                if new:
                    raise NotDeclared(kind, name)
                del objects[kind][name]
            else:
                objects[kind][name] = stored
            merge(from_file, file, objects)  # SpecError: nothing is written
            row = session.get(ProxyObject, (kind, name))
            if stored is None:
                session.delete(row)
            elif row is None:
                session.add(
                    ProxyObject(kind=kind, name=name, spec=stored, updated_at=time.time(), updated_by=actor)
                )
            else:
                row.spec, row.updated_at, row.updated_by = stored, time.time(), actor
        return new
