"""The pipeline spec: one YAML file per pipeline in `settings.pipelines_dir`, validated with pydantic.

Every model forbids unknown fields. Conditions (`filter`, quality `rules`, trigger conditions) and
expressions (`derive`) are parsed with the kernel while the spec is validated, so an unknown
operator is a load-time error at its field, e.g. ``transforms[3].filter.all[1].op: unknown operator``.
The kernel raises `SpecError` relative to its own input; `_kernel_errors_as_validation` turns those
problems into pydantic line errors, which pydantic anchors at the field being validated - so kernel
problems are reported together with every other problem of every file, in the kernel's format.

`PipelineSpec.model_json_schema()` is the JSON Schema for editors (`junction pipelines schema`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import pyarrow as pa
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    SerializerFunctionWrapHandler,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from orchestration.kernel.conditions import Condition, compile_regex, parse_condition
from orchestration.kernel.expressions import Expression, parse_expression
from orchestration.kernel.spec_errors import SpecError, SpecProblem, format_location, load_specs
from orchestration.kernel.times import DurationText, parse_duration, parse_instant
from resources.cache.http_answers import AnswerCacheSpec
from resources.event_stream.core import STREAM_NAME_PATTERN

__all__ = [
    "AGGREGATE_FUNCTIONS",
    "AggregateStep",
    "AssetSourceSpec",
    "RestParentSpec",
    "IncrementalSpec",
    "RestSourceSpec",
    "CompiledCondition",
    "CompiledExpression",
    "EnrichStep",
    "FileSourceSpec",
    "LoadedPipeline",
    "PipelineSpec",
    "SqlSourceSpec",
    "TransformStep",
    "json_schema",
    "load_pipelines",
    "parse_arrow_type",
    "pipeline_files",
]

# Dagster asset names, group names and our pipeline names share this shape.
NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
# Dagster's own default for sensors is 30 s; an event trigger should react within a daemon loop or two.
DEFAULT_TRIGGER_INTERVAL_S = 5


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- kernel sub-parsers inside pydantic ---------------------------------------------------------------

_LOCATION_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _location_parts(location: str) -> tuple[str | int, ...]:
    """`all[1].op` -> ("all", 1, "op"): the inverse of `spec_errors.format_location`."""
    if location.startswith("("):  # "(root)", "(expression)": the sub-parser's whole input
        return ()
    return tuple(int(index) if index else name for name, index in _LOCATION_PART.findall(location))


def _kernel_errors_as_validation(error: SpecError, value: Any) -> ValidationError:
    """The kernel's problems as pydantic line errors; pydantic prefixes them with the field's location."""
    details = [
        InitErrorDetails(
            type=PydanticCustomError("kernel", "{reason}", {"reason": problem.reason}),
            loc=_location_parts(problem.location),
            input=value,
        )
        for problem in error.problems
    ]
    return ValidationError.from_exception_data("kernel", details)


@dataclass(frozen=True)
class CompiledCondition:
    """A condition as written in the spec and its parsed tree (parsed once, at load)."""

    source: Any
    tree: Condition


@dataclass(frozen=True)
class CompiledExpression:
    source: str
    tree: Expression


def _compile_condition(value: Any) -> CompiledCondition:
    if isinstance(value, CompiledCondition):
        return value
    try:
        return CompiledCondition(value, parse_condition(value))
    except SpecError as exc:
        raise _kernel_errors_as_validation(exc, value) from None


def _compile_expression(value: Any) -> CompiledExpression:
    if isinstance(value, CompiledExpression):
        return value
    if not isinstance(value, str):
        raise ValueError(f"an expression must be a string, got {type(value).__name__}")
    try:
        return CompiledExpression(value, parse_expression(value))
    except SpecError as exc:
        raise _kernel_errors_as_validation(exc, value) from None


ConditionField = Annotated[
    Any,
    AfterValidator(_compile_condition),
    PlainSerializer(lambda compiled: compiled.source),
    WithJsonSchema(
        {
            "type": "object",
            "description": "A kernel condition: {field, op, value} or {all: [...]}, {any: [...]}, {not: {...}}",
        }
    ),
]
ExpressionField = Annotated[
    Any,
    AfterValidator(_compile_expression),
    PlainSerializer(lambda compiled: compiled.source),
    WithJsonSchema({"type": "string", "description": "A kernel expression, e.g. upper(trim(name))"}),
]


# --- Arrow type names ---------------------------------------------------------------------------------

_DECIMAL = re.compile(r"^decimal\(\s*(\d+)\s*,\s*(\d+)\s*\)$")
_TIMESTAMP = re.compile(r"^timestamp\[\s*(s|ms|us|ns)\s*(?:,\s*([^\]\s]+)\s*)?\]$")
_FRIENDLY_ALIASES = {
    "int": "int64",
    "integer": "int64",
    "float": "float64",
    "boolean": "bool",
    "text": "string",
}


def parse_arrow_type(text: str) -> pa.DataType:
    """A type name from a spec as an Arrow type.

    Arrow's own aliases (`pa.type_for_alias`: int8..int64, uint8..uint64, float32/float64/double,
    bool, string, large_string, binary, date32, date64, timestamp[ms]...) plus ``int``, ``float``,
    ``boolean``, ``text``, ``date`` (date32), ``timestamp`` (microseconds, naive),
    ``timestamp[unit, Time/Zone]`` and ``decimal(precision, scale)``.
    """
    name = text.strip().lower() if isinstance(text, str) else text
    if not isinstance(name, str) or not name:
        raise ValueError(f"unknown type {text!r}")
    if match := _DECIMAL.match(name):
        precision, scale = int(match[1]), int(match[2])
        if not 1 <= precision <= 76 or scale > precision:
            raise ValueError(f"invalid decimal {text!r}: precision 1..76, scale at most the precision")
        return pa.decimal128(precision, scale) if precision <= 38 else pa.decimal256(precision, scale)
    if match := _TIMESTAMP.match(text.strip()):
        return pa.timestamp(match[1], match[2]) if match[2] else pa.timestamp(match[1])
    name = {"date": "date32", "timestamp": "timestamp[us]"}.get(name, _FRIENDLY_ALIASES.get(name, name))
    try:
        return pa.type_for_alias(name)
    except ValueError:
        raise ValueError(f"unknown type {text!r}") from None


def _check_type_name(text: str) -> str:
    parse_arrow_type(text)
    return text


TypeName = Annotated[str, AfterValidator(_check_type_name)]


def _check_regex(pattern: str) -> str:
    _, reason = compile_regex(pattern)
    if reason:
        raise ValueError(reason)
    return pattern


Regex = Annotated[str, AfterValidator(_check_regex)]
DottedPath = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*(:[A-Za-z_][A-Za-z0-9_]*)?$",
        description="package.module:function (or package.module.function)",
    ),
]
FieldName = Annotated[str, Field(min_length=1)]


# --- sources ------------------------------------------------------------------------------------------


class CsvOptions(StrictModel):
    """How a CSV file is split into fields (pyarrow.csv's ParseOptions and ReadOptions)."""

    delimiter: str = Field(default=",", min_length=1, max_length=1)
    quote_char: str | None = Field(default='"', min_length=1, max_length=1, description="null: no quoting")
    double_quote: bool = Field(default=True, description='"" inside a quoted value is one quote')
    escape_char: str | None = Field(default=None, min_length=1, max_length=1)
    header: bool = Field(default=True, description="The first line (after skip_rows) names the columns")
    column_names: list[FieldName] | None = Field(default=None, description="Names when there is no header")
    skip_rows: int = Field(default=0, ge=0, description="Lines skipped before the header")
    null_values: list[str] | None = Field(default=None, description="Strings read as null (Arrow's default)")
    newlines_in_values: bool = Field(
        default=False,
        description="Quoted values may span lines. The file is then parsed in one piece (held in "
        "memory) and positions are record numbers rather than lines.",
    )

    @model_validator(mode="after")
    def _names_without_header(self) -> CsvOptions:
        if self.header and self.column_names:
            raise ValueError("column_names is for files without a header (header: false)")
        return self


class SourceOptions(StrictModel):
    """What every source kind takes."""

    allow_empty: bool = Field(
        default=False,
        description="A read of no records from an input that holds data succeeds (default: the run "
        "fails and says what the input holds, e.g. XML elements other than the record element)",
    )


class FileSourceSpec(SourceOptions):
    """Files on disk: one path or a glob, relative to the spec's folder (or to `package`)."""

    kind: Literal["file"] = "file"
    format: Literal["csv", "json", "jsonl", "xml", "parquet"]
    path: str = Field(min_length=1, description="A path or glob (*, **, ?); .gz, .bz2 and .zip are read too")
    package: str | None = Field(
        default=None,
        description="Resolve `path` inside this installed Python package (e.g. a data package)",
    )
    encoding: str = Field(default="utf-8", description="Text encoding of CSV, JSON, JSON Lines and XML")
    csv: CsvOptions = Field(default_factory=CsvOptions)
    xml_record: str | None = Field(
        default=None,
        min_length=1,
        description="XML element holding one record (default: the element repeated nearest the root, "
        "detected per file and logged)",
    )
    identity: Literal["stat", "content"] = Field(
        default="stat",
        description="What identifies an input for load ids: path+size+mtime (stat) or a SHA-256 of the bytes",
    )

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        import codecs

        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"unknown encoding {value!r}") from None
        return value

    @model_validator(mode="after")
    def _options_match_format(self) -> FileSourceSpec:
        # Compared with the defaults rather than "was it given", so that a dumped spec validates again.
        if self.csv != CsvOptions() and self.format != "csv":
            raise ValueError(f"csv options do not apply to format {self.format!r}")
        if self.xml_record is not None and self.format != "xml":
            raise ValueError(f"xml_record does not apply to format {self.format!r}")
        return self


class SqlSourceSpec(SourceOptions):
    """A table or a parameterized query, streamed with a server-side cursor in chunks of batch_size."""

    kind: Literal["sql"]
    url_env: str | None = Field(default=None, description="NAME of the env var holding the SQLAlchemy URL")
    url: str | None = Field(
        default=None,
        description="A URL without secrets (e.g. sqlite:///data.db; a relative SQLite path is relative "
        "to the spec's folder)",
    )
    table: str | None = None
    query: str | None = Field(default=None, description="SQL with :named parameters")
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_of_each(self) -> SqlSourceSpec:
        if (self.url is None) == (self.url_env is None):
            raise ValueError("give exactly one of url and url_env")
        if (self.table is None) == (self.query is None):
            raise ValueError("give exactly one of table and query")
        if self.params and self.query is None:
            raise ValueError("params go with a query")
        return self


# --- REST sources (read by assets/etl/sources/rest.py) --------------------------------------------------

EnvVarName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="NAME of an env var")]


class BearerAuthSpec(StrictModel):
    """`Authorization: Bearer <token>`."""

    type: Literal["bearer"]
    token_env: EnvVarName


class ApiKeyAuthSpec(StrictModel):
    """An API key in a header or a query parameter."""

    type: Literal["api_key"]
    key_env: EnvVarName
    name: str = Field(default="X-API-Key", min_length=1, description="The header or query parameter")
    location: Literal["header", "query"] = "header"


class BasicAuthSpec(StrictModel):
    """HTTP basic authentication."""

    type: Literal["basic"]
    username: str | None = Field(default=None, description="Or username_env")
    username_env: EnvVarName | None = None
    password_env: EnvVarName

    @model_validator(mode="after")
    def _one_username(self) -> BasicAuthSpec:
        if (self.username is None) == (self.username_env is None):
            raise ValueError("give exactly one of username and username_env")
        return self


class OAuth2ClientCredentialsSpec(StrictModel):
    """OAuth2 client credentials: a token fetched from `token_url`, kept until it expires, fetched
    again once when the API answers 401."""

    type: Literal["oauth2_client_credentials"]
    token_url: str = Field(pattern=r"^https?://", description="The authorization server's token endpoint")
    client_id_env: EnvVarName
    client_secret_env: EnvVarName
    scopes: list[str] = Field(default_factory=list)
    credentials_in: Literal["body", "basic"] = Field(
        default="body", description="Send the client id and secret in the form body or as basic auth"
    )


class PageNumberPaginatorSpec(StrictModel):
    """`?page=1`, `?page=2`, ... until `total_pages` (or the total records) is reached or a page is empty."""

    type: Literal["page_number"]
    page_param: str = "page"
    base_page: int = Field(default=1, ge=0, description="The first page's number")
    total_pages_path: str | None = Field(default=None, description="JSONPath to the number of pages")
    total_path: str | None = Field(default=None, description="JSONPath to the number of records")


class OffsetPaginatorSpec(StrictModel):
    """`?offset=0&limit=100`, `?offset=100&limit=100`, ... until a short page or the total."""

    type: Literal["offset"]
    limit: int = Field(ge=1, description="Records per page")
    offset_param: str = "offset"
    limit_param: str = "limit"
    total_path: str | None = Field(default=None, description="JSONPath to the number of records")


class CursorPaginatorSpec(StrictModel):
    """The next page's cursor is in the body (`cursor_path`) and goes into `cursor_param`; no cursor
    (missing, null, empty) ends the pages."""

    type: Literal["cursor"]
    cursor_path: str = Field(min_length=1, description="JSONPath to the next cursor, e.g. meta.next_cursor")
    cursor_param: str = Field(default="cursor", min_length=1)


class NextUrlPaginatorSpec(StrictModel):
    """The next page's URL is in the body (`next_url_path`); none ends the pages."""

    type: Literal["next_url"]
    next_url_path: str = Field(default="next", min_length=1)


class LinkHeaderPaginatorSpec(StrictModel):
    """The next page's URL is in the `Link` header (RFC 8288), `rel="next"`."""

    type: Literal["link_header"]
    rel: str = "next"


class SinglePagePaginatorSpec(StrictModel):
    type: Literal["single_page"]


class AutoPaginatorSpec(StrictModel):
    """Detected from the first answer (a Link header, a next URL, a cursor or a page count in the body)
    and logged; a first page that looks full with nothing detected fails the run."""

    type: Literal["auto"] = "auto"


PAGINATOR_SPECS: dict[str, type[StrictModel]] = {
    "auto": AutoPaginatorSpec,
    "page_number": PageNumberPaginatorSpec,
    "offset": OffsetPaginatorSpec,
    "cursor": CursorPaginatorSpec,
    "next_url": NextUrlPaginatorSpec,
    "link_header": LinkHeaderPaginatorSpec,
    "single_page": SinglePagePaginatorSpec,
}
AUTH_SPECS: dict[str, type[StrictModel]] = {
    "bearer": BearerAuthSpec,
    "api_key": ApiKeyAuthSpec,
    "basic": BasicAuthSpec,
    "oauth2_client_credentials": OAuth2ClientCredentialsSpec,
}


class RestRetrySpec(StrictModel):
    """Connection errors, 429 and 5xx are retried with exponential backoff and jitter, waiting what
    `Retry-After` asks when the server sends it."""

    max_attempts: int = Field(default=5, ge=1, le=20, description="Attempts per request in all (1: no retry)")
    initial_backoff: DurationText = "500ms"
    max_backoff: DurationText = Field(default="30s", description="Also caps a server's Retry-After")


def _tagged(models: dict[str, type[BaseModel]], default: str | None, tag: str = "kind") -> PlainValidator:
    """Validate a union tagged by `kind` with the tagged model itself.

    pydantic's discriminated unions put the tag into error locations (``source.file.path``); validating
    with the chosen model inside a validator keeps them as the user wrote them (``source.path``).
    """
    expected = " or ".join(repr(kind) for kind in models)

    def validate(value: Any) -> BaseModel:
        if isinstance(value, tuple(models.values())):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"must be a mapping, got {type(value).__name__}")
        kind = value.get(tag, default)
        if kind not in models:
            raise ValueError(f"{tag} must be {expected}" + ("" if kind is None else f", got {kind!r}"))
        return models[kind].model_validate(value)

    union = models[next(iter(models))]
    for model in list(models.values())[1:]:
        union = union | model
    return PlainValidator(validate, json_schema_input_type=union)


class AssetSourceSpec(SourceOptions):
    """Another pipeline's published output, read in chunks where that pipeline published it (its SQL
    table or file). The staged asset depends on that published asset, so the lineage graph shows it."""

    kind: Literal["asset"]
    pipeline: Annotated[str, Field(pattern=NAME_PATTERN)] | None = Field(
        default=None, description="The pipeline whose published asset is read"
    )
    asset: str | None = Field(
        default=None,
        min_length=1,
        description="Or the published asset's key (parts joined with /); a pipeline publishes the key <name>",
    )

    @model_validator(mode="after")
    def _one_reference(self) -> AssetSourceSpec:
        if (self.pipeline is None) == (self.asset is None):
            raise ValueError("give exactly one of pipeline and asset")
        return self

    @property
    def field(self) -> str:
        """The field holding the reference: where a problem with it is reported."""
        return "pipeline" if self.pipeline is not None else "asset"


def _tagged_by_type(models: dict[str, type[BaseModel]], default: str | None) -> PlainValidator:
    """As `_tagged`, for unions tagged by `type` (paginators, auth); a bare string names the type."""
    inner = _tagged(models, default, tag="type")

    def validate(value: Any) -> BaseModel:
        return inner.func({"type": value} if isinstance(value, str) else value)  # type: ignore[call-arg]

    union = models[next(iter(models))]
    for model in list(models.values())[1:]:
        union = union | model
    return PlainValidator(validate, json_schema_input_type=union | str)


PaginatorSpec = Annotated[
    AutoPaginatorSpec
    | PageNumberPaginatorSpec
    | OffsetPaginatorSpec
    | CursorPaginatorSpec
    | NextUrlPaginatorSpec
    | LinkHeaderPaginatorSpec
    | SinglePagePaginatorSpec,
    _tagged_by_type(PAGINATOR_SPECS, default=None),
    PlainSerializer(lambda model: model.model_dump()),
]
AuthSpec = Annotated[
    BearerAuthSpec | ApiKeyAuthSpec | BasicAuthSpec | OAuth2ClientCredentialsSpec,
    _tagged_by_type(AUTH_SPECS, default=None),
    PlainSerializer(lambda model: model.model_dump()),
]


class RestParentSpec(AssetSourceSpec):
    """The parent resource of a REST source: another pipeline's published records, one child read
    per parent record (`parent.<field>` in the child's templates, e.g. path `orders/{{ parent.id }}/lines`).
    The child's staged asset depends on the parent's published asset, so lineage shows it after."""

    kind: Literal["asset"] = "asset"
    carry: dict[Annotated[str, Field(min_length=1)], Annotated[str, Field(min_length=1)]] = Field(
        min_length=1,
        description="Child column <- parent field, copied into each child row (e.g. {order_id: id}): "
        "the parent's key. An incremental cursor naming a carried column reads only the parents in the window.",
    )


class RestSourceSpec(SourceOptions):
    """An HTTP API answering JSON, read page by page (assets/etl/sources/rest.py).

    `path`, `params` and `headers` are kernel templates: `incremental` (start, end, last_value,
    initial), `run` (id, and start and end of the time the run stands for: from the schedule's tick
    before to the tick that launched it), `platform.url` (the platform's public URL) and, in a
    stream-triggered run, `trigger` (keys, events, ids) are defined.
    """

    kind: Literal["rest"]
    base_url: str = Field(min_length=1, description="e.g. https://api.example.com/v2 (a template)")
    path: str = Field(default="", description="Appended to base_url, e.g. orders (a template)")
    method: Literal["GET", "POST"] = "GET"
    headers: dict[str, str] = Field(default_factory=dict, description="Templates; secrets go in auth")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Query parameters; strings are templates"
    )
    auth: AuthSpec | None = None
    paginator: PaginatorSpec = Field(default_factory=AutoPaginatorSpec)
    data_selector: str | None = Field(
        default=None,
        description="JSONPath to the records in a page (default: the body when it is a list, else its "
        "list of objects, detected and logged)",
    )
    nested: Literal["flatten", "json"] = Field(
        default="flatten",
        description="Nested objects: flatten to columns joined by `separator` (a.b -> a__b), or keep each "
        "top-level object as a JSON text column. Lists are kept as JSON text.",
    )
    separator: str = Field(default="__", min_length=1)
    timeout: DurationText = Field(default="30s", description="Per request")
    rate_limit: float | None = Field(default=None, gt=0, description="Requests per second at most")
    max_pages: int | None = Field(default=None, ge=1, description="Stop after this many pages (a guard)")
    retry: RestRetrySpec = Field(default_factory=RestRetrySpec)
    parent: RestParentSpec | None = Field(
        default=None, description="Read this resource once per record of another pipeline (parent -> child)"
    )
    max_concurrency: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Requests in flight at once: a parent's children, or the pages of a resource whose "
        "first page says how many there are (page_number with total_pages_path, offset with total_path); "
        "other paginators follow one page after another (each page tells the next)",
    )

    cache: AnswerCacheSpec | None = Field(
        default=None,
        description="Keep GET answers in a cache namespace (caches.yaml): a fresh one is reused without a "
        "request, a stale one with an ETag or Last-Modified is revalidated (If-None-Match / "
        "If-Modified-Since; 304 reuses it)",
    )

    @model_validator(mode="after")
    def _templates_parse(self) -> RestSourceSpec:
        from orchestration.kernel.templates import TemplateRenderError, compile_template, referenced_variables

        for name, text in [
            ("base_url", self.base_url),
            ("path", self.path),
            *self.headers.items(),
            *((key, value) for key, value in self.params.items() if isinstance(value, str)),
        ]:
            try:
                compile_template(text)
            except TemplateRenderError as exc:
                raise ValueError(f"{name}: {exc}") from None
        uses_parent = any(
            path == "parent" or path.startswith("parent.")
            for text in self.template_texts()
            for path in referenced_variables(text)
        )
        if self.cache is not None and self.method != "GET":
            raise ValueError(f"cache: only GET answers are kept, and this source sends {self.method}")
        if uses_parent and self.parent is None:
            raise ValueError("the templates read parent.*, but the source declares no parent")
        if self.parent is not None and not uses_parent:
            raise ValueError(
                "parent: no template reads parent.* (e.g. path: orders/{{ parent.id }}/lines), so every "
                "parent record would ask for the same thing"
            )
        return self

    def template_texts(self) -> list[str]:
        """The source's texts that are templates: base_url, path, headers, string params."""
        texts = [self.base_url, self.path, *self.headers.values()]
        return texts + [value for value in self.params.values() if isinstance(value, str)]


SourceSpec = Annotated[
    FileSourceSpec | SqlSourceSpec | AssetSourceSpec | RestSourceSpec,
    _tagged(
        {"file": FileSourceSpec, "sql": SqlSourceSpec, "asset": AssetSourceSpec, "rest": RestSourceSpec},
        default="file",
    ),
    PlainSerializer(lambda model: model.model_dump(by_alias=True)),
]


# --- transforms ---------------------------------------------------------------------------------------


class MapStep(StrictModel):
    field: FieldName
    values: dict[str, Any] = Field(min_length=1, description="old value (as text) -> new value")
    unmatched: Literal["keep", "null"] = "keep"
    to: FieldName | None = Field(default=None, description="Write to this field (default: in place)")


class RegexReplace(StrictModel):
    pattern: Regex
    replacement: str = Field(alias="with")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class CleanseStep(StrictModel):
    fields: list[FieldName] | None = Field(default=None, description="Default: every string field")
    trim: bool = False
    case: Literal["lower", "upper", "title"] | None = None
    null_tokens: list[str] = Field(default_factory=list, description="Values that mean null (after trim)")
    replace: list[RegexReplace] = Field(default_factory=list)
    defaults: dict[FieldName, Any] = Field(default_factory=dict, description="Fill nulls, per field")


class DedupeStep(StrictModel):
    keys: list[FieldName] = Field(min_length=1)
    keep: Literal["first", "last"] = Field(
        default="first",
        description="first streams, holding the keys seen; last holds every row until the input ends",
    )


class PythonStep(StrictModel):
    function: DottedPath
    frame: Literal["arrow", "pandas"] = "arrow"


class EnrichStep(StrictModel):
    """A lookup join: each row gets the lookup's columns for its key (a left join, one match at most).

    The lookup (a file, SQL table/query or another pipeline's asset) is read once per run and held
    in memory; it should be small next to the data (reference tables: airlines, airports, customers).
    """

    lookup: SourceSpec
    on: dict[FieldName, FieldName] | list[FieldName] = Field(
        description="Key fields: {field: lookup_field}, or a list of fields named alike in both",
    )
    columns: list[FieldName] | None = Field(
        default=None, min_length=1, description="Lookup columns to add (default: all but its keys)"
    )
    prefix: str = Field(default="", description="Prepended to the added columns' names")
    unmatched: Literal["keep", "drop", "quarantine"] = Field(
        default="keep",
        description="Rows without a match: keep (added columns null), drop (counted as filtered), "
        "quarantine (with the key in the reason)",
    )
    lookup_duplicates: Literal["error", "first"] = Field(
        default="error",
        description="A key found more than once in the lookup: fail the run (error) or use its first row",
    )
    cache: str | None = Field(
        default=None,
        pattern=r"^[a-z][a-z0-9_]*$",
        description="A cache namespace (caches.yaml) holding the lookup between runs, for its ttl: a run "
        "then reads the lookup only when the cache has none (invalidate tag `lookup:<step>` to force)",
    )

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, data: Any) -> Any:
        # YAML 1.1 (PyYAML) reads the bare key `on` as the boolean true.
        if isinstance(data, dict) and True in data and "on" not in data:
            data = {("on" if key is True else key): value for key, value in data.items()}
        return data

    @field_validator("on")
    @classmethod
    def _keys_as_mapping(cls, value: dict[str, str] | list[str]) -> dict[str, str]:
        if not value:
            raise ValueError("name at least one key field")
        if isinstance(value, list):
            if len(set(value)) != len(value):
                raise ValueError("a key field is named twice")
            return {name: name for name in value}
        return value

    @property
    def added_columns(self) -> list[str] | None:
        """The names the step adds (None when `columns` is not given: the lookup decides)."""
        return None if self.columns is None else [self.prefix + name for name in self.columns]


AGGREGATE_FUNCTIONS = ("count", "sum", "mean", "min", "max", "first", "last")


def _check_aggregate_function(value: str) -> str:
    if value not in AGGREGATE_FUNCTIONS:
        raise ValueError(f"unknown function {value!r}; use one of {', '.join(AGGREGATE_FUNCTIONS)}")
    return value


class AggregateMetric(StrictModel):
    fn: Annotated[
        str,
        AfterValidator(_check_aggregate_function),
        WithJsonSchema({"enum": list(AGGREGATE_FUNCTIONS)}),
    ] = Field(description="count (rows, or non-null values of `field`), sum, mean, min, max, first, last")
    field: FieldName | None = Field(default=None, description="The aggregated field (count: optional)")

    @model_validator(mode="after")
    def _field_unless_count(self) -> AggregateMetric:
        if self.field is None and self.fn != "count":
            raise ValueError(f"{self.fn} needs a field")
        return self


class AggregateStep(StrictModel):
    """Group by fields and compute metrics per group; the groups replace the rows.

    Holds its whole input in memory: every row reaching this step is kept until the input ends,
    then grouped at once (pyarrow's hash aggregation). first/last are the first/last non-null value in
    input order. Nulls are skipped by sum/mean/min/max; count without a field counts rows.
    """

    by: list[FieldName] = Field(min_length=1, description="The grouping fields")
    metrics: dict[FieldName, AggregateMetric] = Field(
        min_length=1, description="New field -> {fn, field}, e.g. mean_delay: {fn: mean, field: dep_delay}"
    )

    @model_validator(mode="after")
    def _distinct_names(self) -> AggregateStep:
        if len(set(self.by)) != len(self.by):
            raise ValueError("by names a field twice")
        clashes = [name for name in self.metrics if name in self.by]
        if clashes:
            raise ValueError(f"metric {clashes[0]!r} has the name of a grouping field")
        return self


TRANSFORM_KINDS = (
    "select",
    "rename",
    "map",
    "cast",
    "cleanse",
    "derive",
    "filter",
    "dedupe",
    "enrich",
    "aggregate",
    "python",
)


class TransformStep(StrictModel):
    """One step, written as a one-key mapping: ``- cast: {amount: float64}``."""

    select: list[FieldName] | None = Field(default=None, min_length=1)
    rename: dict[FieldName, FieldName] | None = Field(default=None, min_length=1)
    map: MapStep | None = None
    cast: dict[FieldName, TypeName] | None = Field(default=None, min_length=1)
    cleanse: CleanseStep | None = None
    derive: dict[FieldName, ExpressionField] | None = Field(default=None, min_length=1)
    filter: ConditionField | None = Field(default=None, description="Keep the rows matching the condition")
    dedupe: DedupeStep | None = None
    enrich: EnrichStep | None = None
    aggregate: AggregateStep | None = Field(
        default=None, description="Group and compute metrics; holds its whole input in memory"
    )
    python: PythonStep | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_kind(cls, data: Any) -> Any:
        if isinstance(data, dict) and len(data) != 1:
            given = ", ".join(map(str, data)) or "nothing"
            raise ValueError(f"a step is one of {', '.join(TRANSFORM_KINDS)}, each on its own (got {given})")
        return data

    @model_serializer(mode="wrap")
    def _dump_the_one_kind(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {self.kind: handler(self)[self.kind]}

    @property
    def kind(self) -> str:
        return next(name for name in TRANSFORM_KINDS if getattr(self, name) is not None)

    @property
    def options(self) -> Any:
        return getattr(self, self.kind)


# --- quality, contract, target ------------------------------------------------------------------------


class QualityRule(StrictModel):
    """A condition every row should satisfy; checked over the staged data (GX, next slice)."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    condition: ConditionField
    severity: Literal["error", "warn"] = "error"
    blocking: bool = Field(default=False, description="A failure stops the publish step")
    mostly: float = Field(default=1.0, gt=0, le=1, description="Share of rows that must pass")
    description: str | None = None


class ColumnContract(StrictModel):
    type: TypeName | None = None
    required: bool = False
    unique: bool = False
    allowed: list[Any] | None = Field(default=None, min_length=1)
    min: float | int | None = None
    max: float | int | None = None

    @model_validator(mode="after")
    def _range(self) -> ColumnContract:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


class SchemaContract(StrictModel):
    drift: Literal["evolve", "freeze", "discard_row", "discard_value"] = Field(
        default="evolve",
        description="Columns added/removed/retyped against the target's current schema (the previous "
        "run's result): evolve the target (a retyped column's values go to <name>__v_<kind>), freeze "
        "(fail the run before staging), discard_row (quarantine rows holding values in new or retyped "
        "columns), discard_value (drop those values, keep the rows). Removed columns are null in new rows "
        "except under freeze. See assets/etl/drift.py",
    )
    columns: dict[FieldName, ColumnContract] = Field(default_factory=dict)


class SqlTargetSpec(StrictModel):
    kind: Literal["sql"]
    url_env: str | None = None
    url: str | None = Field(
        default=None, description="A relative SQLite path is relative to $JUNCTION_HOME (created if missing)"
    )
    table: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")]
    children: list[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]] = Field(
        default_factory=list,
        description="List fields published as child tables <table>__<field>, one row per element with "
        "the parent's load.keys as <table>_<key> and _junction_list_index (assets/etl/child_tables.py)",
    )

    @model_validator(mode="after")
    def _one_url(self) -> SqlTargetSpec:
        if (self.url is None) == (self.url_env is None):
            raise ValueError("give exactly one of url and url_env")
        return self


class FileTargetSpec(StrictModel):
    kind: Literal["file"]
    format: Literal["parquet", "csv"]
    path: str = Field(min_length=1)


class RestTargetSpec(StrictModel):
    """Rows pushed to an HTTP API, one request per row or per `batch_size` rows (reverse sync;
    assets/etl/rest_target.py). `url`, `body`, `headers` and `idempotency_key` are kernel templates
    with `row` (the request's first row), `rows` (all of them) and `platform.url`; with `batch_size` >
    1 the default body is the list of the rows. With `load.mode: merge` only rows new or changed since
    their last successful push are sent (a ledger of what was sent, under $JUNCTION_HOME/rest/).
    """

    kind: Literal["rest"]
    url: str = Field(min_length=1, description="e.g. https://crm.example.com/api/contacts/{{ row.id }}")
    method: Literal["POST", "PUT", "PATCH"] = "POST"
    headers: dict[str, str] = Field(default_factory=dict, description="Templates; secrets go in auth")
    auth: AuthSpec | None = None
    batch_size: int = Field(default=1, ge=1, le=1000, description="Rows per request")
    body: dict[str, Any] | str | None = Field(
        default=None,
        description="A mapping whose strings are templates, or one template rendering to JSON text "
        "(use `| tojson` for typed values); default: the row as a JSON object",
    )
    idempotency_key: str | None = Field(
        default=None,
        description="Sent as the Idempotency-Key header (a template), so a re-sent row is applied once",
    )
    timeout: DurationText = Field(default="30s", description="Per request")
    rate_limit: float | None = Field(default=None, gt=0, description="Requests per second at most")
    retry: RestRetrySpec = Field(default_factory=RestRetrySpec)
    max_failed_rows: int = Field(
        default=0, ge=0, description="Rows the API may refuse before the publish fails (they are quarantined)"
    )

    @model_validator(mode="after")
    def _templates_parse(self) -> RestTargetSpec:
        from orchestration.kernel.templates import TemplateRenderError, compile_template

        texts = [("url", self.url), ("idempotency_key", self.idempotency_key or ""), *self.headers.items()]
        if isinstance(self.body, str):
            texts.append(("body", self.body))
        for name, text in texts:
            try:
                compile_template(text)
            except TemplateRenderError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return self


TargetSpec = Annotated[
    SqlTargetSpec | FileTargetSpec | RestTargetSpec,
    _tagged({"sql": SqlTargetSpec, "file": FileTargetSpec, "rest": RestTargetSpec}, default=None),
    PlainSerializer(lambda model: model.model_dump(by_alias=True)),
]


class DeletesSpec(StrictModel):
    """How a merge learns that a source record is gone (assets/etl/loads.py applies it at publish).

    `soft`: the source's own tombstones, a condition on the record (`{field: status, op: eq, value:
    deleted}`). `detect: full_compare`: a full read whose keys are compared with the target's; target
    keys the source no longer returns are deleted. With `incremental`, the full read happens once per
    `every` (the other runs read their window); without it, every run reads everything and compares.
    `mode`: `delete` removes the target's row, `flag` keeps it with `_junction_deleted_at` set (a key
    that comes back is live again).
    """

    soft: ConditionField | None = Field(default=None, description="A record matching it is a tombstone")
    detect: Literal["full_compare"] | None = None
    every: DurationText | None = Field(
        default=None, description="With detect and incremental: how often a run reads everything (1d)"
    )
    mode: Literal["delete", "flag"] = "delete"

    @model_validator(mode="after")
    def _something_to_detect(self) -> DeletesSpec:
        if self.soft is None and self.detect is None:
            raise ValueError("deletes: give soft (a tombstone condition), detect: full_compare, or both")
        if self.every is not None and self.detect is None:
            raise ValueError("deletes.every: sets how often detect: full_compare runs; give detect too")
        return self


class LoadSpec(StrictModel):
    mode: Literal["append", "replace", "merge"] = "append"
    keys: list[FieldName] = Field(default_factory=list, description="Merge keys")
    deletes: DeletesSpec | None = Field(default=None, description="Delete detection (merge only)")

    @model_validator(mode="after")
    def _keys_for_merge(self) -> LoadSpec:
        if self.mode == "merge" and not self.keys:
            raise ValueError("merge needs keys")
        if self.mode != "merge" and self.keys:
            raise ValueError(f"keys only apply to merge, not {self.mode}")
        if self.deletes is not None and self.mode != "merge":
            raise ValueError(f"deletes: apply to a merge by keys, not to {self.mode}")
        return self


class StreamTrigger(StrictModel):
    """Run the pipeline on events of a declared stream (a sensor of `sensors/event_triggers.py`)."""

    type: Literal["stream"] = "stream"
    stream: Annotated[str, Field(pattern=STREAM_NAME_PATTERN, description="A declared stream, e.g. orders")]
    condition: ConditionField | None = None
    debounce_seconds: int = Field(
        default=0, ge=0, description="One run per closed time window of this length (0: no windows)"
    )
    max_events_per_run: int | None = Field(default=None, ge=1, description="One run per N events")
    key: str | None = Field(
        default=None,
        description="A payload field (dotted: customer.id) whose values narrow the run's read: `trigger.keys` "
        "in a REST source's templates, e.g. params: {ids: \"{{ trigger.keys | join(',') if trigger else '' }}\"}",
    )
    minimum_interval_seconds: int = Field(
        default=DEFAULT_TRIGGER_INTERVAL_S,
        ge=1,
        le=86_400,
        description="Seconds between two evaluations of the trigger's sensor (the daemon loops every ~5 s)",
    )


class PollTrigger(StrictModel):
    """Run the pipeline when its API has records past the committed cursor: a Dagster sensor asking
    for the first page of the incremental window every `every` (`sensors/poll_triggers.py`), for APIs
    that publish no change events."""

    type: Literal["poll"]
    every: DurationText = Field(default="1m", description="How often the API is asked (at least 5s)")


TriggerSpec = Annotated[
    StreamTrigger | PollTrigger,
    _tagged({"stream": StreamTrigger, "poll": PollTrigger}, default="stream", tag="type"),
    PlainSerializer(lambda model: model.model_dump()),
]

CursorValue = Annotated[str | int | float, Field(description="An ISO 8601 date/time or a number")]


class IncrementalSpec(StrictModel):
    """Read only what changed since the last published run: records whose `cursor` field is past the
    cursor value the target holds (assets/etl/state.py). The value commits with the data, in the
    publish transaction, so a failed run reads the same range again.

    A file source is incremental by file, with no cursor (`incremental: {}`): only files that are new
    or changed since the last publish are read, told apart by path + size + modification time, or by
    content hash with `source.identity: content`."""

    cursor: FieldName | None = Field(
        default=None, description="The source field that grows with each change, e.g. updated_at"
    )
    initial: CursorValue | None = Field(
        default=None, description="Where the first run starts, e.g. '2024-01-01' or 0"
    )
    lag: DurationText | float | None = Field(
        default=None,
        description="Re-read this much before the last value (a duration for times, a number for "
        "numbers): late writers are caught, and merge by key makes the overlap idempotent",
    )
    end: CursorValue | None = Field(default=None, description="Records at or past this value are not read")

    @model_validator(mode="after")
    def _one_kind_of_value(self) -> IncrementalSpec:
        if self.cursor is None:
            given = [name for name in ("initial", "lag", "end") if getattr(self, name) is not None]
            if given:
                raise ValueError(
                    f"{', '.join(given)}: go with a cursor (a file source is incremental by file)"
                )
            return self
        if self.initial is None:
            raise ValueError(
                "initial: where the first run starts, e.g. '2024-01-01' or 0, goes with a cursor"
            )
        kind = _cursor_kind(self.initial)
        if kind is None:
            raise ValueError(f"initial: {self.initial!r} is neither a number nor an ISO 8601 date/time")
        if self.end is not None and _cursor_kind(self.end) != kind:
            raise ValueError(f"end: {self.end!r} is not a {kind} as initial is")
        if isinstance(self.lag, str) and kind != "time":
            raise ValueError("lag: a duration goes with a time cursor; give a number for a number cursor")
        if isinstance(self.lag, int | float) and not isinstance(self.lag, bool) and kind != "number":
            raise ValueError("lag: a time cursor takes a duration (10m, 1h)")
        return self

    @property
    def kind(self) -> str:
        return _cursor_kind(self.initial) or "number"

    @property
    def by_file(self) -> bool:
        return self.cursor is None


def _cursor_kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str) and parse_instant(value) is not None:
        return "time"
    return None


def _check_cron(value: str) -> str:
    # Dagster's own check: the schedule is handed to Dagster as is. Imported here because the spec
    # module must stay cheap; dagster is loaded anyway wherever schedules are built.
    from dagster._utils.schedules import is_valid_cron_string

    if not is_valid_cron_string(value):
        raise ValueError(f"{value!r} is not a cron expression (five fields, e.g. '0 6 * * *')")
    return value


class PipelineSpec(StrictModel):
    """One ETL pipeline: a source, transforms, rules and contract, and a target."""

    SPEC_SHAPE: ClassVar[str] = "a pipeline spec is a mapping with at least source (and target, to publish)"

    name: Annotated[str, Field(pattern=NAME_PATTERN)] | None = Field(
        default=None, description="Default: the file name without .yaml"
    )
    description: str | None = None
    source: SourceSpec
    transforms: list[TransformStep] = Field(default_factory=list)
    rules: list[QualityRule] = Field(default_factory=list)
    contract: SchemaContract = Field(default_factory=SchemaContract)
    target: TargetSpec | None = None
    load: LoadSpec = Field(default_factory=LoadSpec)
    batch_size: int = Field(default=50_000, ge=1, le=10_000_000)
    schedule: Annotated[str, AfterValidator(_check_cron)] | None = None
    timezone: str = "UTC"
    owners: list[str] = Field(default_factory=list)
    tags: dict[str, str] = Field(default_factory=dict)
    group: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    triggers: list[TriggerSpec] = Field(default_factory=list)
    incremental: IncrementalSpec | None = None

    @model_validator(mode="after")
    def _incremental_fits(self) -> PipelineSpec:
        incremental = self.incremental
        if incremental is None:
            return self
        if not isinstance(self.source, RestSourceSpec | SqlSourceSpec | FileSourceSpec):
            raise ValueError(f"incremental: reads REST, SQL and file sources, not {self.source.kind} sources")
        if isinstance(self.source, FileSourceSpec) != incremental.by_file:
            raise ValueError(
                "incremental: a file source is incremental by file (no cursor: `incremental: {}`)"
                if incremental.cursor is not None
                else "incremental.cursor: a REST or SQL source needs the field that grows with each change"
            )
        if self.target is None or (self.target.kind == "file" and self.target.format != "parquet"):
            raise ValueError(
                "incremental: needs a SQL, Parquet or REST target, which keeps the cursor with the data"
            )
        if self.load.mode == "replace":
            raise ValueError(
                "incremental: a replace would drop every row outside the range read; use merge or append"
            )
        if incremental.lag and self.load.mode != "merge":
            raise ValueError(
                "incremental.lag re-reads records: it needs load.mode merge, which makes that idempotent"
            )
        return self

    @model_validator(mode="after")
    def _poll_triggers_fit(self) -> PipelineSpec:
        if sum(isinstance(trigger, PollTrigger) for trigger in self.triggers) > 1:
            raise ValueError("triggers: one poll trigger per pipeline (one cursor to ask past)")
        for trigger in self.triggers:
            if isinstance(trigger, PollTrigger):
                if isinstance(self.source, RestSourceSpec) and self.source.parent is not None:
                    raise ValueError(
                        "triggers: a child resource (source.parent) has no first page to poll; poll its "
                        "parent pipeline and run this one after it"
                    )
                if not isinstance(self.source, RestSourceSpec) or self.incremental is None:
                    raise ValueError(
                        "triggers: a poll trigger asks a REST source for records past the cursor; it needs "
                        "source.kind rest and incremental"
                    )
                every = parse_duration(trigger.every)
                if every is None or every.total_seconds() < 5:
                    raise ValueError("triggers: a poll trigger's every is at least 5s (the daemon's loop)")
        return self

    @model_validator(mode="after")
    def _child_tables_have_a_parent_key(self) -> PipelineSpec:
        if isinstance(self.target, SqlTargetSpec) and self.target.children and not self.load.keys:
            raise ValueError(
                "target.children: each child row carries its parent's key: use load.mode merge with keys "
                "(a merge replaces the children of the parents it publishes)"
            )
        return self

    @model_validator(mode="after")
    def _rest_target_fits(self) -> PipelineSpec:
        if self.target is not None and self.target.kind == "rest" and self.load.mode == "replace":
            raise ValueError(
                "load.mode: a REST target cannot be replaced; use append (send every row) or merge"
            )
        return self

    @model_validator(mode="after")
    def _deletes_fit(self) -> PipelineSpec:
        deletes = self.load.deletes
        if deletes is None:
            return self
        if self.target is None or self.target.kind == "rest":
            raise ValueError(
                "load.deletes: applies to SQL and file targets (a table the merge can delete from)"
            )
        if deletes.detect is not None and deletes.every is None and self.incremental is not None:
            raise ValueError(
                "load.deletes.every: with incremental, say how often a run reads everything to compare "
                "keys (e.g. 1d)"
            )
        if deletes.every is not None and self.incremental is None:
            raise ValueError(
                "load.deletes.every: without incremental every run reads everything and compares; "
                "drop every, or add incremental"
            )
        return self

    @field_validator("rules")
    @classmethod
    def _unique_rule_names(cls, rules: list[QualityRule]) -> list[QualityRule]:
        names = [rule.name for rule in rules]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"rule names must be unique: {', '.join(duplicates)}")
        return rules

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @model_validator(mode="after")
    def _known_field_references(self) -> PipelineSpec:
        problems = field_reference_problems(self)
        if problems:
            raise ValidationError.from_exception_data(
                "fields",
                [
                    InitErrorDetails(
                        type=PydanticCustomError("fields", "{reason}", {"reason": reason}),
                        loc=location,
                        input=None,
                    )
                    for location, reason in problems
                ],
            )
        return self


# --- field references ---------------------------------------------------------------------------------

Location = tuple[str | int, ...]


def field_reference_problems(spec: PipelineSpec) -> list[tuple[Location, str]]:
    """References to fields that cannot exist at their step, where the fields are known at load time.

    A source's fields are known only once read, so checking starts after a step that decides them
    (select, aggregate) and follows rename, map, derive and enrich (with listed columns); a python
    step or an enrich taking all lookup columns makes them unknown again. Merge keys and contract
    columns are checked against the fields the transforms end with.
    """
    problems: list[tuple[Location, str]] = []
    known: list[str] | None = None

    def check(location: Location, names: Iterable[str]) -> None:
        if known is None:
            return
        for name in names:
            if name not in known:
                problems.append((location, f"no field {name!r} here (the fields are {', '.join(known)})"))

    for index, step in enumerate(spec.transforms):
        at: Location = ("transforms", index, step.kind)
        options = step.options
        if step.kind == "select":
            for offset, name in enumerate(options):
                check((*at, offset), [name])
            known = list(options)
        elif step.kind == "rename":
            for name in options:
                check((*at, name), [name])
            known = None if known is None else [options.get(name, name) for name in known]
        elif step.kind == "map":
            check((*at, "field"), [options.field])
            if known is not None and options.to and options.to not in known:
                known = [*known, options.to]
        elif step.kind == "cast":
            for name in options:
                check((*at, name), [name])
        elif step.kind == "cleanse":
            for offset, name in enumerate(options.fields or []):
                check((*at, "fields", offset), [name])
        elif step.kind == "derive":
            known = None if known is None else [*known, *(name for name in options if name not in known)]
        elif step.kind == "dedupe":
            for offset, name in enumerate(options.keys):
                check((*at, "keys", offset), [name])
        elif step.kind == "enrich":
            for name in options.on:
                check((*at, "on", name), [name])
            added = options.added_columns
            if added is None:
                known = None
            elif known is not None:
                for name in added:
                    if name in known:
                        problems.append(
                            ((*at, "columns"), f"{name!r} is a field already; set a prefix (or select)")
                        )
                known = [*known, *added]
        elif step.kind == "aggregate":
            for offset, name in enumerate(options.by):
                check((*at, "by", offset), [name])
            for metric, definition in options.metrics.items():
                if definition.field is not None:
                    check((*at, "metrics", metric, "field"), [definition.field])
            known = [*options.by, *options.metrics]
        elif step.kind == "python":
            known = None
    for offset, name in enumerate(spec.load.keys):
        check(("load", "keys", offset), [name])
    for name in spec.contract.columns:
        check(("contract", "columns", name), [name])
    return problems


def asset_references(spec: PipelineSpec) -> list[tuple[Location, AssetSourceSpec]]:
    """Where the spec reads another pipeline's published asset: its source, its enrich lookups."""
    found: list[tuple[Location, AssetSourceSpec]] = []
    if isinstance(spec.source, AssetSourceSpec):
        found.append((("source",), spec.source))
    if isinstance(spec.source, RestSourceSpec) and spec.source.parent is not None:
        found.append((("source", "parent"), spec.source.parent))
    for index, step in enumerate(spec.transforms):
        if step.enrich is not None and isinstance(step.enrich.lookup, AssetSourceSpec):
            found.append((("transforms", index, "enrich", "lookup"), step.enrich.lookup))
    return found


# --- loading ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedPipeline:
    """A validated spec with the file it came from (relative source paths resolve against its folder)."""

    name: str
    spec: PipelineSpec
    file: Path
    # The pipelines whose published assets this one reads (source, enrich lookups), by name.
    upstream: Mapping[str, LoadedPipeline] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def base_dir(self) -> Path:
        return self.file.parent


def pipeline_files(directory: Path | None = None) -> list[Path]:
    if directory is None:
        from orchestration.settings import get_settings

        directory = get_settings().pipelines_dir
    return sorted(Path(directory).glob("*.yaml"))


def load_pipelines(files: Iterable[Path] | None = None) -> dict[str, LoadedPipeline]:
    """Every spec (default: all `*.yaml` in `settings.pipelines_dir`), each problem of each file at once."""
    paths = [Path(path) for path in (pipeline_files() if files is None else files)]
    specs = load_specs(paths, PipelineSpec)
    loaded: dict[str, LoadedPipeline] = {}
    problems: list[SpecProblem] = []
    for path, spec in specs.items():
        name = spec.name or path.stem
        if not re.match(NAME_PATTERN, name):
            problems.append(
                SpecProblem(
                    "name", f"{name!r} cannot name a pipeline; set name: (letters, digits, _)", str(path)
                )
            )
        elif name in loaded:
            problems.append(
                SpecProblem("name", f"{name!r} is also the name of {loaded[name].file}", str(path))
            )
        else:
            loaded[name] = LoadedPipeline(name, spec, path)
    if problems:
        raise SpecError(problems)
    return _resolve_upstream(loaded)


def _published_by(reference: AssetSourceSpec, candidates: Mapping[str, LoadedPipeline]) -> tuple[str, str]:
    """(pipeline name, problem or ""): which pipeline publishes what `reference` names."""
    if reference.pipeline is not None:
        name = reference.pipeline
        if name not in candidates:
            known = ", ".join(sorted(candidates)) or "none"
            return name, f"no pipeline named {name!r} (pipelines: {known})"
    else:
        name = reference.asset or ""
        if name not in candidates:
            staged_of = name.removesuffix("_staged")
            if name != staged_of and staged_of in candidates:
                return name, (
                    f"{name!r} is the staged asset of pipeline {staged_of!r}; read its published "
                    f"asset {staged_of!r}"
                )
            published = ", ".join(sorted(n for n, p in candidates.items() if p.spec.target)) or "none"
            return name, f"no pipeline publishes the asset {name!r} (published assets: {published})"
    if candidates[name].spec.target is None:
        return name, f"pipeline {name!r} has no target, so it publishes nothing to read"
    return name, ""


def _beside(file: Path, loaded: Mapping[str, LoadedPipeline]) -> dict[str, LoadedPipeline]:
    """The valid specs in `file`'s folder that were not loaded: what a reference may name when only
    some files are loaded (`junction pipelines validate FILE`). Their own problems are theirs."""
    taken = {pipeline.file.resolve() for pipeline in loaded.values()}
    found: dict[str, LoadedPipeline] = {}
    for path in pipeline_files(file.parent):
        if path.resolve() in taken:
            continue
        try:
            spec = load_specs([path], PipelineSpec)[path]
        except SpecError:
            continue
        found.setdefault(spec.name or path.stem, LoadedPipeline(spec.name or path.stem, spec, path))
    return found


def _resolve_upstream(loaded: dict[str, LoadedPipeline]) -> dict[str, LoadedPipeline]:
    """Tie every asset reference to the pipeline publishing it; unknown names and cycles are problems."""
    problems: list[SpecProblem] = []
    candidates: dict[str, LoadedPipeline] = dict(loaded)
    looked_beside: set[Path] = set()
    edges: dict[str, list[tuple[str, Location, AssetSourceSpec]]] = {}
    for name, pipeline in loaded.items():
        for location, reference in asset_references(pipeline.spec):
            if (
                reference.pipeline or reference.asset
            ) not in candidates and pipeline.base_dir not in looked_beside:
                looked_beside.add(pipeline.base_dir)
                for other, found in _beside(pipeline.file, candidates).items():
                    candidates.setdefault(other, found)
            upstream, problem = _published_by(reference, candidates)
            if problem:
                problems.append(
                    SpecProblem(format_location((*location, reference.field)), problem, str(pipeline.file))
                )
            else:
                edges.setdefault(name, []).append((upstream, location, reference))
    problems.extend(_cycle_problems(loaded, edges))
    if problems:
        raise SpecError(problems)
    return {
        name: dataclasses.replace(
            pipeline, upstream={upstream: candidates[upstream] for upstream, _, _ in edges.get(name, [])}
        )
        for name, pipeline in loaded.items()
    }


def _cycle_problems(
    loaded: Mapping[str, LoadedPipeline], edges: Mapping[str, list[tuple[str, Location, AssetSourceSpec]]]
) -> list[SpecProblem]:
    """One problem per cycle of pipelines reading each other, at the reference that closes it."""
    problems: list[SpecProblem] = []
    seen_cycles: set[frozenset[str]] = set()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        for upstream, location, reference in edges.get(name, []):
            if upstream in path:
                cycle = [*path[path.index(upstream) :], upstream]
                if frozenset(cycle) not in seen_cycles:
                    seen_cycles.add(frozenset(cycle))
                    problems.append(
                        SpecProblem(
                            format_location((*location, reference.field)),
                            f"pipelines read each other in a cycle: {' -> '.join(cycle)}",
                            str(loaded[name].file),
                        )
                    )
            elif upstream not in done:
                visit(upstream, [*path, upstream])
        done.add(name)

    for name in sorted(edges):
        if name not in done:
            visit(name, [name])
    return problems


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a pipeline spec, for editors (yaml-language-server, VS Code)."""
    schema = PipelineSpec.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Junction pipeline spec"
    return schema
