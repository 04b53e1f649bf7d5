"""How a REST source walks an API's pages: one small class per pagination style, one registry.

A paginator sees each answer (`Page`: the response, its JSON body or None when it is not JSON, and
the records selected from it) and says what to request next, or None when the pages are done. The
first request is the source's own URL and parameters, adjusted by `first` (a page number, an
offset). `AutoPaginator` decides on the first answer, as dlt's `rest_api` does, and says what it
chose; it never settles for a single page when the answer says there are more.
"""

from __future__ import annotations

import functools
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import httpx

from assets.etl.spec import (
    AutoPaginatorSpec,
    CursorPaginatorSpec,
    LinkHeaderPaginatorSpec,
    NextUrlPaginatorSpec,
    OffsetPaginatorSpec,
    PageNumberPaginatorSpec,
    SinglePagePaginatorSpec,
)
from orchestration.errors import JunctionError

__all__ = ["PAGINATORS", "Page", "Paginator", "find_first", "open_paginator"]

Params = dict[str, Any]
Request = tuple[str, Params]

# Request parameters that ask for a page size: a first page exactly this full is a page of many.
PAGE_SIZE_PARAMS = ("limit", "per_page", "page_size", "pageSize", "size", "count", "max_results")
NEXT_URL_PATHS = (
    "next",
    "next_url",
    "nextUrl",
    "next_page_url",
    "links.next",
    "_links.next.href",
    "paging.next",
)
TOTAL_PAGES_PATHS = ("total_pages", "totalPages", "page_count", "meta.total_pages", "pagination.total_pages")
MORE_FLAGS = ("has_more", "hasMore", "more")


@functools.lru_cache(maxsize=256)
def _compiled(path: str) -> Any:
    from jsonpath_ng.ext import parse

    return parse(path)


def find_first(body: Any, path: str) -> Any:
    """The first value at JSONPath `path` in `body` (None when nothing matches)."""
    if body is None:
        return None
    matches = _compiled(path).find(body)
    return matches[0].value if matches else None


@dataclass(frozen=True)
class Page:
    number: int  # 1-based: the how-many-th answer of this resource
    response: httpx.Response
    body: Any | None  # None when the body is not JSON (the page is quarantined)
    records: list[Any]


class Paginator(ABC):
    name: str = ""

    def first(self, params: Params) -> Params:
        return params

    @abstractmethod
    def next_request(self, url: str, params: Params, page: Page) -> Request | None:
        """The next request after `page` (made with `url` and `params`), or None: no more pages."""

    def later_requests(self, url: str, params: Params, first: Page) -> list[Request] | None:
        """Every request after the first page when that page says how many there are (so they can
        be made at once), else None: each page then tells the next."""
        return None

    def describe(self) -> str:
        return self.name

    def _unreadable(self, page: Page, what: str) -> JunctionError:
        return JunctionError(
            f"cannot page past page {page.number}: its body is not JSON, and the {what} is in the body"
        )


class SinglePage(Paginator):
    name = "single_page"

    def __init__(self, spec: SinglePagePaginatorSpec | None = None):
        pass

    def next_request(self, url: str, params: Params, page: Page) -> Request | None:
        return None


class PageNumber(Paginator):
    name = "page_number"

    def __init__(self, spec: PageNumberPaginatorSpec):
        self.spec = spec
        self.records_seen = 0

    def first(self, params: Params) -> Params:
        return {**params, self.spec.page_param: self.spec.base_page}

    def next_request(self, url: str, params: Params, page: Page) -> Request | None:
        self.records_seen += len(page.records)
        number = int(params[self.spec.page_param])
        if self.spec.total_pages_path and page.body is not None:
            total_pages = find_first(page.body, self.spec.total_pages_path)
            if isinstance(total_pages, int) and number - self.spec.base_page + 1 >= total_pages:
                return None
        if self.spec.total_path and page.body is not None:
            total = find_first(page.body, self.spec.total_path)
            if isinstance(total, int) and self.records_seen >= total:
                return None
        if page.body is not None and not page.records:
            return None
        return url, {**params, self.spec.page_param: number + 1}

    def later_requests(self, url: str, params: Params, first: Page) -> list[Request] | None:
        if not self.spec.total_pages_path or first.body is None or not first.records:
            return None
        total_pages = find_first(first.body, self.spec.total_pages_path)
        if not isinstance(total_pages, int):
            return None
        base = self.spec.base_page
        return [(url, {**params, self.spec.page_param: base + index}) for index in range(1, total_pages)]

    def describe(self) -> str:
        return f"page_number ({self.spec.page_param} from {self.spec.base_page})"


class Offset(Paginator):
    name = "offset"

    def __init__(self, spec: OffsetPaginatorSpec):
        self.spec = spec

    def first(self, params: Params) -> Params:
        return {**params, self.spec.offset_param: 0, self.spec.limit_param: self.spec.limit}

    def next_request(self, url: str, params: Params, page: Page) -> Request | None:
        offset = int(params[self.spec.offset_param]) + self.spec.limit
        if page.body is not None:
            if len(page.records) < self.spec.limit:
                return None
            total = find_first(page.body, self.spec.total_path) if self.spec.total_path else None
            if isinstance(total, int) and offset >= total:
                return None
        return url, {**params, self.spec.offset_param: offset}

    def later_requests(self, url: str, params: Params, first: Page) -> list[Request] | None:
        if not self.spec.total_path or first.body is None or len(first.records) < self.spec.limit:
            return None
        total = find_first(first.body, self.spec.total_path)
        if not isinstance(total, int):
            return None
        limit = self.spec.limit
        return [(url, {**params, self.spec.offset_param: offset}) for offset in range(limit, total, limit)]


class Cursor(Paginator):
    name = "cursor"

    def __init__(self, spec: CursorPaginatorSpec):
        self.spec = spec

    def next_request(self, url: str, params: Params, page: Page) -> Request | None:
        if page.body is None:
            raise self._unreadable(page, "next cursor")
        cursor = find_first(page.body, self.spec.cursor_path)
        if cursor is None or cursor == "" or cursor is False:
            return None
        return url, {**params, self.spec.cursor_param: cursor}

    def describe(self) -> str:
        return f"cursor ({self.spec.cursor_path} -> ?{self.spec.cursor_param}=)"


class NextUrl(Paginator):
    name = "next_url"

    def __init__(self, spec: NextUrlPaginatorSpec):
        self.spec = spec

    def next_request(self, url: str, params: Params, page: Page) -> Request | None:
        if page.body is None:
            raise self._unreadable(page, "next URL")
        following = find_first(page.body, self.spec.next_url_path)
        if not isinstance(following, str) or not following:
            return None
        # The next URL carries its own query; a relative one resolves against the page's URL.
        return str(page.response.url.join(following)), {}

    def describe(self) -> str:
        return f"next_url ({self.spec.next_url_path})"


class LinkHeader(Paginator):
    """RFC 8288 `Link` headers, as httpx parses them (`Response.links`)."""

    name = "link_header"

    def __init__(self, spec: LinkHeaderPaginatorSpec):
        self.spec = spec

    def next_request(self, url: str, params: Params, page: Page) -> Request | None:
        link = page.response.links.get(self.spec.rel)
        if not link or not link.get("url"):
            return None
        return str(page.response.url.join(link["url"])), {}


def _cursor_param(key: str) -> str:
    """The parameter a body's `next_<x>` (or `next<X>`) cursor goes into: `<x>`."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf.startswith("next_"):
        return leaf.removeprefix("next_")
    if re.match(r"next[A-Z]", leaf):
        rest = leaf.removeprefix("next")
        return rest[0].lower() + rest[1:]
    return "cursor"


CURSOR_PATHS = (
    "next_cursor",
    "nextCursor",
    "next_page_token",
    "nextPageToken",
    "meta.next_cursor",
    "pagination.next_cursor",
    "cursor.next",
)


class AutoPaginator(Paginator):
    """Chooses on the first answer; `chosen` says what, for the run's log."""

    name = "auto"

    def __init__(self, spec: AutoPaginatorSpec | None = None):
        self.inner: Paginator | None = None
        self.chosen = ""

    def next_request(self, url: str, params: Params, page: Page) -> Request | None:
        if self.inner is None:
            self.inner, self.chosen = self._detect(page, params)
        return self.inner.next_request(url, params, page)

    def _detect(self, page: Page, params: Params) -> tuple[Paginator, str]:
        if page.response.links.get("next"):
            return LinkHeader(LinkHeaderPaginatorSpec(type="link_header")), 'a Link header with rel="next"'
        body = page.body if isinstance(page.body, dict) else None
        if body is not None:
            for path in NEXT_URL_PATHS:
                value = find_first(body, path)
                if isinstance(value, str) and (value.startswith(("http://", "https://", "/", "?"))):
                    spec = NextUrlPaginatorSpec(type="next_url", next_url_path=path)
                    return NextUrl(spec), f"a next URL at {path}"
            cursor_keys = [*CURSOR_PATHS, *(key for key in body if re.match(r"next(_|[A-Z])", key))]
            for path in cursor_keys:
                value = find_first(body, path)
                if isinstance(value, str | int) and not isinstance(value, bool) and value != "":
                    param = _cursor_param(path)
                    spec = CursorPaginatorSpec(type="cursor", cursor_path=path, cursor_param=param)
                    return Cursor(spec), f"a cursor at {path}, sent as ?{param}="
            for path in TOTAL_PAGES_PATHS:
                value = find_first(body, path)
                if isinstance(value, int) and not isinstance(value, bool):
                    current = find_first(body, "page")
                    base = 0 if current == 0 else 1
                    spec = PageNumberPaginatorSpec(type="page_number", base_page=base, total_pages_path=path)
                    paginator = PageNumber(spec)
                    params.setdefault("page", current if isinstance(current, int) else base)
                    return paginator, f"page numbers up to {path} ({value} pages)"
            more = next((flag for flag in MORE_FLAGS if body.get(flag) is True), None)
            if more:
                raise JunctionError(
                    f"the first page says {more}: true, but no paginator was declared or detected: "
                    "declare source.paginator"
                )
        size_param = next((name for name in PAGE_SIZE_PARAMS if name in params), None)
        if (
            size_param is not None
            and page.body is not None
            and len(page.records) >= _as_int(params[size_param])
        ):
            raise JunctionError(
                f"the first page holds {len(page.records)} records, as many as {size_param}={params[size_param]} "
                "asks, so there are probably more, but no paginator was declared or detected: "
                "declare source.paginator"
            )
        return SinglePage(), "a single page (no Link header, next URL, cursor or page count in the answer)"


def _as_int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 1 << 62


PAGINATORS: dict[type, type[Paginator]] = {
    AutoPaginatorSpec: AutoPaginator,
    PageNumberPaginatorSpec: PageNumber,
    OffsetPaginatorSpec: Offset,
    CursorPaginatorSpec: Cursor,
    NextUrlPaginatorSpec: NextUrl,
    LinkHeaderPaginatorSpec: LinkHeader,
    SinglePagePaginatorSpec: SinglePage,
}


def open_paginator(spec: Any) -> Paginator:
    """A fresh paginator (they hold state while walking) for the spec's `paginator`."""
    return PAGINATORS[type(spec)](spec)
