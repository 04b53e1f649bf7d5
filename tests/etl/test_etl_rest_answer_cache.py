"""A REST source's GET answers kept in a cache namespace (`source.cache`): a fresh answer is reused
without a request; a stale one is revalidated with If-None-Match / If-Modified-Since and a 304 reuses
it; a changed page is fetched again; `no-store` is never kept; another credential never reads an
answer. On the memory + Redis + database layers, so a second process (a restart) revalidates too."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from rest_api import Upstream, start_upstream

from assets.etl.quarantine import Quarantine, RowCounts
from assets.etl.runner import iter_pipeline
from assets.etl.sources import open_source
from assets.etl.sources.rest import RestSource
from assets.etl.spec import PipelineSpec
from orchestration.errors import JunctionError
from orchestration.kernel.spec_errors import SpecError, load_specs

PAGED = {"type": "page_number", "total_pages_path": "total_pages"}


@pytest.fixture(scope="module")
def served() -> Iterator[Upstream]:
    upstream, server = start_upstream()
    yield upstream
    server.shutdown()


@pytest.fixture
def upstream(served: Upstream) -> Iterator[Upstream]:
    """25 records in pages of 10 (3 pages), no auth, answers with ETags."""
    served.set_records(25)
    served.page_size = 10
    served.auth = ("none",)
    served.validators, served.cache_control, served.not_modified = "etag", None, 0
    with served.lock:
        served.requests.clear()
    yield served
    served.validators = served.cache_control = None


@pytest.fixture
def caches(tmp_path: Path, store_url: str, clean_redis_url: str, monkeypatch) -> Iterator[None]:
    """Namespaces `answers` (used for an hour) and `revalidated` (stale at once, kept a day to be
    revalidated), on memory, Redis and the platform store."""
    from orchestration.settings import reset_settings_cache
    from resources.cache import close_caches

    layers = ["memory", "redis", "database"]
    path = tmp_path / "caches.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "namespaces": {
                    "answers": {"layers": layers, "ttl": "1h"},
                    "revalidated": {"layers": layers, "ttl": "1h", "stale_grace": "1d"},
                }
            }
        )
    )
    monkeypatch.setenv("JUNCTION_CACHES_FILE", str(path))
    monkeypatch.setenv("JUNCTION_REDIS_URL", clean_redis_url)
    reset_settings_cache()
    close_caches()
    yield
    close_caches()


def spec_of(upstream: Upstream, cache: dict, **source: object) -> PipelineSpec:
    return PipelineSpec.model_validate(
        {
            "source": {
                "kind": "rest",
                "base_url": upstream.url,
                "path": "page/records",
                "paginator": PAGED,
                "max_concurrency": 1,
                "cache": cache,
                **source,
            }
        }
    )


def read(spec: PipelineSpec) -> tuple[list[dict], RestSource]:
    source = open_source(spec.source, base_dir=None, batch_size=spec.batch_size)  # type: ignore[arg-type]
    assert isinstance(source, RestSource)
    rows = [
        row for table in iter_pipeline(spec, source, Quarantine(), RowCounts()) for row in table.to_pylist()
    ]
    return rows, source


def conditional_headers(upstream: Upstream) -> list[tuple[str | None, str | None]]:
    with upstream.lock:
        return [
            (headers.get("If-None-Match"), headers.get("If-Modified-Since"))
            for _, _, _, headers in upstream.requests
        ]


def test_a_fresh_answer_is_reused_without_a_request(upstream: Upstream, caches):
    spec = spec_of(upstream, {"namespace": "answers"})
    first, source = read(spec)
    assert len(first) == 25 and source.requests_made == 3
    assert source.answers == {"cached": 0, "revalidated": 0, "fetched": 3}
    second, source = read(spec)
    assert second == first
    assert source.requests_made == 0 and source.answers == {"cached": 3, "revalidated": 0, "fetched": 0}
    assert len(upstream.requests) == 3


def test_a_stale_answer_is_revalidated_by_its_etag_and_a_changed_page_fetched(upstream: Upstream, caches):
    from resources.cache import close_caches

    spec = spec_of(upstream, {"namespace": "revalidated", "ttl": "0s"})
    first, _ = read(spec)
    close_caches()  # another process (a restart): the answers come from Redis and the store
    second, source = read(spec)
    assert second == first
    assert source.answers == {"cached": 0, "revalidated": 3, "fetched": 0}
    assert upstream.not_modified == 3
    sent = conditional_headers(upstream)
    assert [etag is None for etag, _ in sent] == [True] * 3 + [False] * 3, "the second read asked with ETags"
    # A record of page 2 changes: that page's ETag with it.
    upstream.records[14]["name"] = "renamed"
    third, source = read(spec)
    assert source.answers == {"cached": 0, "revalidated": 2, "fetched": 1}
    assert [row["name"] for row in third if row["id"] == 15] == ["renamed"]
    assert len(third) == 25


def test_last_modified_is_revalidated_with_if_modified_since(upstream: Upstream, caches):
    upstream.validators = "last_modified"
    spec = spec_of(upstream, {"namespace": "revalidated", "ttl": "0s"})
    read(spec)
    _, source = read(spec)
    assert source.answers == {"cached": 0, "revalidated": 3, "fetched": 0}
    assert all(since is not None and etag is None for etag, since in conditional_headers(upstream)[3:])


def test_no_store_is_never_kept_and_max_age_is_the_ttl_when_none_is_given(upstream: Upstream, caches):
    upstream.validators, upstream.cache_control = None, "no-store"
    spec = spec_of(upstream, {"namespace": "answers"})
    read(spec)
    _, source = read(spec)
    assert source.answers == {"cached": 0, "revalidated": 0, "fetched": 3}
    upstream.cache_control = "max-age=0"  # stale at once; no validators: asked again in full
    read(spec)
    _, source = read(spec)
    assert source.answers == {"cached": 0, "revalidated": 0, "fetched": 3}


def test_another_credential_never_reads_an_answer(upstream: Upstream, caches, monkeypatch):
    monkeypatch.setenv("TOKEN_A", "token-a")
    monkeypatch.setenv("TOKEN_B", "token-b")
    upstream.auth = ("bearer", "token-a")

    def with_token(env: str) -> PipelineSpec:
        return spec_of(upstream, {"namespace": "answers"}, auth={"type": "bearer", "token_env": env})

    read(with_token("TOKEN_A"))
    _, source = read(with_token("TOKEN_A"))
    assert source.answers["cached"] == 3
    with pytest.raises(JunctionError, match="answered 401"):
        read(with_token("TOKEN_B"))  # not served token A's answers: asked, and refused


def test_cache_errors_name_the_field(upstream: Upstream, caches, tmp_path: Path):
    spec_file = tmp_path / "posted.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            {
                "source": {
                    "kind": "rest",
                    "base_url": upstream.url,
                    "method": "POST",
                    "cache": {"namespace": "answers"},
                }
            }
        )
    )
    with pytest.raises(SpecError) as caught:
        load_specs([spec_file], PipelineSpec)
    assert "posted.yaml" in str(caught.value) and "cache: only GET answers are kept" in str(caught.value)
    with pytest.raises(JunctionError, match=r"source.cache.namespace: .*no cache namespace 'nope'"):
        read(spec_of(upstream, {"namespace": "nope"}))
