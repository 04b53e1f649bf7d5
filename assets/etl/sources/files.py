"""File sources: CSV, JSON, JSON Lines, XML and Parquet files, read in batches of Arrow tables.

CSV and JSON Lines are split into lines and decoded by us, in chunks of `batch_size` lines, then parsed
by pyarrow (`pyarrow.csv` with an `invalid_row_handler`, `pyarrow.json`). Doing the line split
ourselves is what makes every malformed line quarantinable with its number instead of fatal. The
split is vectorised over the chunk's bytes (numpy: newline positions, blank lines, quote parity per
line with one `reduceat`) and the lines are an Arrow array over those same bytes, so no Python object
is made per line; a chunk whose lines are all fine goes to Arrow's parser as it was read, and only
the suspicious lines take a slower path:

- bytes that do not decode in the declared encoding: the chunk is checked in one call (Arrow's UTF-8
  validator, or a decode for other encodings), and only when that fails decoded line by line, to find
  the bad lines;
- an unclosed quote (an odd number of quote characters on a line): Arrow would otherwise swallow the
  rest of the block into one value;
- a wrong number of fields: pyarrow's `invalid_row_handler` skips the row and tells us its number;
- a JSON line that is not valid JSON or not an object: found with the stdlib's `json` only when
  pyarrow rejects the chunk.

CSV columns are read as strings: types are decided by the spec's `cast` step, which quarantines the
values that do not convert. (Inferring types from the first block would make a late bad value fail
the whole file.) With ``newlines_in_values: true`` a record may span lines, so the file is parsed in
one piece (held in memory) and positions are record numbers.

JSON (one array of records) is decoded element by element with `json.JSONDecoder.raw_decode`; after a
broken element the reader resynchronises at the next line starting with ``{`` (the shape of exported
and pretty-printed arrays). The whole file is held in memory.

XML is parsed with the stdlib's expat (`xml.parsers.expat`) rather than lxml: expat is always there,
streams, protects against entity-expansion attacks and reports line and byte positions, which is
what quarantine needs; lxml's `recover=True` would silently repair records instead of reporting them.
Each `xml_record` element is a record: its attributes and the text of its child elements are the
fields (strings, typed by `cast`). Without `xml_record` the record element is detected per file (the
element repeated nearest the root, `XmlSurvey`) and the choice is logged; a file that yields no
record although it holds elements fails the run, naming the elements it holds (`allow_empty: true`
accepts it). After a well-formedness error the reader quarantines the broken
record and restarts at the next record element; a record element opened directly in an open record
means the open one was never closed, so that one is quarantined and the new one read. The file is
held in memory.

Parquet is read with `pyarrow.parquet.ParquetFile.iter_batches`.


Compressed files: ``.gz`` and ``.bz2`` through Arrow's streams, ``.zip`` (one member) through the
stdlib's `zipfile`, which Arrow does not read.
"""

from __future__ import annotations

import codecs
import csv
import glob
import hashlib
import io
import json
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from xml.parsers import expat

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from assets.etl.quarantine import Batch, Quarantine
from assets.etl.sources.base import (
    CARRIAGE_RETURN,
    NEWLINE,
    READ_BLOCK_BYTES,
    READ_STEP,
    InputIdentity,
    Source,
    clip_record,
    records_table,
)
from assets.etl.spec import (
    FileSourceSpec,
)
from orchestration.errors import ConfigurationError, JunctionError


@dataclass(frozen=True)
class _Lines:
    """A chunk of text lines: the UTF-8 bytes (every line ending with a newline), the lines as an Arrow
    array over those bytes (empty where a line does not decode), per line (numpy) its line and record
    number, whether it can be parsed, and the record count so far."""

    data: bytes
    lines: pa.Array
    numbers: np.ndarray
    rows: np.ndarray
    usable: np.ndarray
    records_after: int

    def line_text(self, index: int) -> str:
        return self.lines[index].as_py().removesuffix(b"\n").decode("utf-8", errors="replace")

    def fed(self, mask: np.ndarray) -> tuple[pa.Buffer, np.ndarray, np.ndarray]:
        """The lines where `mask` is true as one buffer (without a copy when that is every line), with
        their line and record numbers."""
        if mask.all():
            return pa.py_buffer(self.data), self.numbers, self.rows
        return _joined_lines(self.lines.filter(pa.array(mask))), self.numbers[mask], self.rows[mask]


# --- files --------------------------------------------------------------------------------------------


class FileSource(Source):
    def __init__(self, spec: FileSourceSpec, base_dir: Path, batch_size: int):
        self.spec = spec
        self.base_dir = Path(base_dir)
        self.batch_size = batch_size
        self._notes: list[str] = []
        # Per XML file read: the record element used and the survey of the file's elements.
        self._xml_reads: list[tuple[Path, str, XmlSurvey]] = []
        # Incremental by file (`skip_files`): the prints of files already published, by path.
        self._known: dict[str, str] | None = None
        self._chosen: list[Path] | None = None
        self.prints: dict[str, str] = {}  # every matching file's print after a read
        self.files_read: list[Path] = []
        self.skipped = 0

    def notes(self) -> list[str]:
        return list(self._notes)

    def empty_input_problem(self) -> str | None:
        # CSV and JSON Lines need no answer: every line that is not blank is a record or quarantined.
        problems = []
        for path, record_tag, survey in self._xml_reads:
            if survey.elements_below_root:
                problems.append(f"{path}: no <{record_tag}> elements; {survey.describe()}")
        return "; ".join(problems) or None

    @property
    def description(self) -> str:
        return f"{self.spec.format} {self.spec.path}" + (
            f" in package {self.spec.package}" if self.spec.package else ""
        )

    def _root(self) -> Path:
        if self.spec.package is None:
            return self.base_dir
        import importlib.util

        # find_spec locates the package without importing it (data packages often import pandas).
        found = importlib.util.find_spec(self.spec.package)
        if found is None or not found.submodule_search_locations:
            raise ConfigurationError(
                f"package {self.spec.package!r} is not installed (source {self.spec.path})"
            )
        return Path(next(iter(found.submodule_search_locations)))

    def files(self) -> list[Path]:
        pattern = Path(self.spec.path).expanduser()
        if not pattern.is_absolute():
            pattern = self._root() / pattern
        matches = sorted(Path(match) for match in glob.glob(str(pattern), recursive=True))
        files = [match for match in matches if match.is_file()]
        if not files:
            raise JunctionError(f"no file matches {pattern}")
        return files

    def skip_files(self, known: dict[str, str]) -> None:
        """Read only files whose print (path + size + mtime, or content hash) is not in `known`."""
        self._known, self._chosen = known, None

    def _print(self, path: Path) -> tuple[str, ...]:
        if self.spec.identity == "content":
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda handle=handle: handle.read(READ_BLOCK_BYTES), b""):
                    digest.update(block)
            return (digest.hexdigest(),)
        stat = path.stat()
        return (str(stat.st_size), str(stat.st_mtime_ns))

    def _to_read(self) -> list[Path]:
        """The files this read takes: every match, or with `skip_files` the new or changed ones
        (decided once per source: the identity and the read see the same files, hashed once)."""
        if self._chosen is not None:
            return self._chosen
        files = self.files()
        if self._known is None:
            return files
        prints = {str(path): ":".join(self._print(path)) for path in files}
        self.prints = {**self._known, **prints}
        chosen = [path for path in files if self._known.get(str(path)) != prints[str(path)]]
        self.skipped = len(files) - len(chosen)
        self._chosen = chosen
        return chosen

    def identity(self) -> InputIdentity:
        return InputIdentity("file", tuple((str(path), *self._print(path)) for path in self._to_read()))

    def read(self, quarantine: Quarantine) -> Iterator[Batch]:
        self._notes.clear()
        self._xml_reads.clear()
        reader = {
            "csv": self._read_csv,
            "jsonl": self._read_json_lines,
            "json": self._read_json_array,
            "xml": self._read_xml,
            "parquet": self._read_parquet,
        }[self.spec.format]
        self.files_read = self._to_read()
        for path in self.files_read:
            yield from reader(path, quarantine)

    # -- bytes and lines --

    def _open(self, path: Path) -> BinaryIO:
        try:
            if path.suffix.lower() == ".zip":
                archive = zipfile.ZipFile(path)
                members = [info for info in archive.infolist() if not info.is_dir()]
                if len(members) != 1:
                    raise JunctionError(
                        f"{path}: a zip source must hold exactly one file, found {len(members)}"
                    )
                return archive.open(members[0])
            if path.suffix.lower() in (".gz", ".bz2"):
                return pa.input_stream(str(path), compression="detect")
            return open(path, "rb")  # noqa: SIM115 - closed by the caller's `with`
        except (OSError, zipfile.BadZipFile, pa.ArrowException) as exc:
            raise JunctionError(f"cannot read {path}: {exc}") from None

    def _read_all(self, path: Path) -> bytes:
        with self._open(path) as stream:
            try:
                return stream.read()
            except (OSError, EOFError, zipfile.BadZipFile, pa.ArrowException) as exc:
                raise JunctionError(f"cannot read {path}: {exc}") from None

    def _line_chunks(self, path: Path) -> Iterator[tuple[int, bytes]]:
        """(number of the first line, the bytes of `batch_size` whole lines), the last chunk as it ends.

        Blocks are only counted until they hold a chunk's lines, then joined once and cut at the
        newlines numpy finds."""
        with self._open(path) as stream:
            held, newlines_held, next_line = [], 0, 1
            while True:
                try:
                    block = stream.read(READ_BLOCK_BYTES)
                except (OSError, EOFError, zipfile.BadZipFile, pa.ArrowException) as exc:
                    raise JunctionError(f"cannot read {path}: {exc}") from None
                if not block:
                    break
                held.append(block)
                newlines_held += int(np.count_nonzero(np.frombuffer(block, np.uint8) == NEWLINE))
                if newlines_held < self.batch_size:
                    continue
                data = b"".join(held)
                ends = np.flatnonzero(np.frombuffer(data, np.uint8) == NEWLINE)
                start = 0
                for last in range(self.batch_size - 1, len(ends), self.batch_size):
                    cut = int(ends[last]) + 1
                    yield next_line, data[start:cut]
                    next_line += self.batch_size
                    start = cut
                held = [data[start:]]
                newlines_held = len(ends) % self.batch_size
            rest = b"".join(held)
            if rest:
                yield next_line, rest

    def _check_line_encoding(self) -> None:
        if "\n".encode(self.spec.encoding, errors="ignore") != b"\n":
            raise JunctionError(
                f"{self.spec.path}: encoding {self.spec.encoding!r} is not line-oriented (e.g. UTF-16); "
                "convert the file to UTF-8"
            )

    def _decode(self, chunk: bytes) -> tuple[bytes, dict[int, tuple[str, bytes]]]:
        """The chunk as UTF-8 (Arrow's encoding), each line ending with a newline, and the lines that
        do not decode: {offset: (why, raw line)}, left empty in the result.

        The chunk is decoded in one call; only when that fails is it decoded line by line.
        """
        encoding = self.spec.encoding
        is_utf8 = codecs.lookup(encoding).name == "utf-8"
        if is_utf8 and _valid_utf8(chunk):
            return (chunk if chunk.endswith(b"\n") else chunk + b"\n"), {}
        try:
            text = chunk.decode(encoding)
        except UnicodeDecodeError:
            pass  # find the bad lines below
        else:
            data = text.encode("utf-8")
            return (data if data.endswith(b"\n") else data + b"\n"), {}
        raw_lines = chunk.split(b"\n")
        if raw_lines[-1] == b"":  # the chunk's last line ended with its newline
            raw_lines.pop()
        decoded: list[bytes] = []
        problems: dict[int, tuple[str, bytes]] = {}
        for offset, line in enumerate(raw_lines):
            try:
                text = line.decode(encoding)
            except UnicodeDecodeError as exc:
                decoded.append(b"")
                problems[offset] = (
                    f"cannot decode as {encoding}: {exc.reason} at byte {exc.start + 1}",
                    line,
                )
                continue
            decoded.append(line if is_utf8 else text.encode("utf-8"))
        return b"\n".join(decoded) + b"\n", problems

    def _chunk_lines(
        self, path: Path, first_line: int, chunk: bytes, records_before: int, quarantine: Quarantine
    ) -> _Lines:
        """A chunk's lines with their line and record numbers (blank lines are not records), found with
        numpy over the bytes, no Python object per line; undecodable lines are quarantined here, where
        their record numbers are known."""
        data, undecodable = self._decode(chunk)
        view = np.frombuffer(data, np.uint8)
        ends = np.flatnonzero(view == NEWLINE)  # every line ends with one (`_decode`)
        starts = np.concatenate([[0], ends[:-1] + 1])
        lengths = ends - starts
        decodable = np.ones(len(ends), dtype=bool)
        decodable[list(undecodable)] = False
        blank = ((lengths == 0) | ((lengths == 1) & (view[starts] == CARRIAGE_RETURN))) & decodable
        is_record = ~blank  # an undecodable line is a record too
        rows = np.cumsum(is_record, dtype=np.int64) + records_before
        numbers = np.arange(first_line, first_line + len(ends), dtype=np.int64)
        for offset, (reason, raw) in undecodable.items():
            quarantine.add(
                str(path), READ_STEP, reason, line=first_line + offset, row=int(rows[offset]),
                record=clip_record(raw.decode(self.spec.encoding, errors="replace")),
            )  # fmt: skip
        offsets = np.concatenate([starts, [len(data)]]).astype(np.int64)
        lines = pa.LargeBinaryArray.from_buffers(
            pa.large_binary(), len(ends), [None, pa.py_buffer(offsets), pa.py_buffer(data)]
        )
        records = int(is_record.sum())
        return _Lines(data, lines, numbers, rows, is_record & decodable, records_before + records)

    # -- CSV --

    def _csv_parse_options(self, handler: Any, newlines_in_values: bool) -> pa_csv.ParseOptions:
        options = self.spec.csv
        return pa_csv.ParseOptions(
            delimiter=options.delimiter,
            quote_char=options.quote_char or False,
            double_quote=options.double_quote,
            escape_char=options.escape_char or False,
            newlines_in_values=newlines_in_values,
            invalid_row_handler=handler,
        )

    def _csv_convert_options(self, names: list[str]) -> pa_csv.ConvertOptions:
        extra = {"null_values": self.spec.csv.null_values} if self.spec.csv.null_values is not None else {}
        return pa_csv.ConvertOptions(
            column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=True, **extra
        )

    def _csv_fields(self, line: str) -> list[str]:
        """One line split by the stdlib's csv module (for the header: Arrow needs the names first)."""
        options = self.spec.csv
        dialect: dict[str, Any] = {"delimiter": options.delimiter, "doublequote": options.double_quote}
        if options.quote_char is None:
            dialect["quoting"] = csv.QUOTE_NONE
        else:
            dialect["quotechar"] = options.quote_char
        if options.escape_char:
            dialect["escapechar"] = options.escape_char
        return next(csv.reader([line], **dialect), [])

    def _unclosed_quotes(self, chunk: _Lines) -> np.ndarray:
        """Lines with an odd number of quote characters (escaped quotes aside), vectorised: a one-byte
        quote is counted per line with numpy over the chunk's bytes; with an escape character in the
        chunk (or a multi-byte quote) Arrow removes the escaped pairs and counts per line."""
        quote, escape = self.spec.csv.quote_char, self.spec.csv.escape_char
        if quote is None:
            return np.zeros(len(chunk.lines), dtype=bool)
        quote_bytes = quote.encode("utf-8")
        if len(quote_bytes) == 1 and not (escape and escape.encode("utf-8") in chunk.data):
            is_quote = (np.frombuffer(chunk.data, np.uint8) == quote_bytes[0]).view(np.uint8)
            starts = np.frombuffer(chunk.lines.buffers()[1], np.int64)[: len(chunk.lines)]
            return np.bitwise_xor.reduceat(is_quote, starts).view(bool)  # odd count: 1
        text = chunk.lines.cast(pa.large_string())
        if escape:
            text = pc.replace_substring_regex(text, pattern=re2_escape(escape) + ".", replacement="")
        odd = pc.equal(pc.bit_wise_and(pc.count_substring(text, pattern=quote), 1), 1)
        return odd.to_numpy(zero_copy_only=False)

    def _read_csv(self, path: Path, quarantine: Quarantine) -> Iterator[Batch]:
        self._check_line_encoding()
        if self.spec.csv.newlines_in_values:
            yield from self._read_csv_whole(path, quarantine)
            return
        options = self.spec.csv
        names: list[str] | None = list(options.column_names) if options.column_names else None
        to_skip = options.skip_rows + (1 if options.header else 0)
        records_before = 0  # records (non-blank lines after the header) in earlier chunks
        for first_line, raw_chunk in self._line_chunks(path):
            chunk_bytes = raw_chunk
            if to_skip:
                skipped = raw_chunk.split(b"\n", to_skip)  # the lines to skip, then the rest
                if len(skipped) > to_skip:
                    chunk_bytes = skipped.pop()
                else:  # every line of the chunk is skipped
                    chunk_bytes = b""
                    if skipped[-1] == b"":  # what follows the chunk's last newline is no line
                        skipped.pop()
                first_line += len(skipped)
                to_skip -= len(skipped)
                if to_skip == 0 and options.header:
                    try:
                        header = skipped[-1].decode(self.spec.encoding)
                    except UnicodeDecodeError:
                        raise JunctionError(
                            f"{path}: the header line cannot be decoded as {self.spec.encoding}"
                        ) from None
                    names = self._csv_fields(header.removeprefix("\ufeff").rstrip("\r"))
                if not chunk_bytes:
                    continue
            # Everything per line from here on is vectorised over the chunk's bytes and lines.
            chunk = self._chunk_lines(path, first_line, chunk_bytes, records_before, quarantine)
            records_before = chunk.records_after
            unclosed = chunk.usable & self._unclosed_quotes(chunk)
            for index in np.flatnonzero(unclosed):  # the few bad lines, one by one
                quarantine.add(
                    str(path), READ_STEP, "unclosed quote", line=int(chunk.numbers[index]),
                    row=int(chunk.rows[index]), record=clip_record(chunk.line_text(index)),
                )  # fmt: skip
            fed_mask = chunk.usable & ~unclosed
            if not fed_mask.any():
                continue
            if names is None:  # no header and no names: f0, f1, ... like Arrow's autogenerated names
                first = chunk.lines[int(np.argmax(fed_mask))].as_py().removesuffix(b"\n")
                names = [f"f{index}" for index in range(len(self._csv_fields(first.decode("utf-8"))))]
            yield from self._parse_csv_lines(path, names, *chunk.fed(fed_mask), quarantine)

    def _parse_csv_lines(
        self,
        path: Path,
        names: list[str],
        data: pa.Buffer,
        line_numbers: np.ndarray,
        record_numbers: np.ndarray,
        quarantine: Quarantine,
    ) -> Iterator[Batch]:
        """Parse lines (each ending with a newline, none blank) whose numbers are given, by Arrow.

        Arrow parses the lines in blocks on its threads; only when some line has the wrong number of
        fields are they parsed again in one block, serially, where Arrow's row numbers (which that
        line's quarantine record needs) are exact."""
        malformed: dict[int, Any] = {}

        def skip_malformed(row: Any) -> str:
            malformed[row.number] = row
            return "skip"

        def parse(serially: bool) -> pa.Table:
            block = {"block_size": data.size + 1} if serially else {}
            try:
                return pa_csv.read_csv(
                    pa.BufferReader(data),
                    read_options=pa_csv.ReadOptions(column_names=names, use_threads=not serially, **block),
                    parse_options=self._csv_parse_options(skip_malformed, newlines_in_values=False),
                    convert_options=self._csv_convert_options(names),
                )
            except pa.ArrowException as exc:
                raise JunctionError(f"cannot read {path} near line {line_numbers[0]}: {exc}") from None

        table = parse(serially=False)
        if malformed:
            malformed.clear()
            table = parse(serially=True)
        keep = np.ones(len(line_numbers), dtype=bool)
        for number, row in malformed.items():  # Arrow's numbers count the rows we fed, from 1
            keep[number - 1] = False
            quarantine.add(
                str(path),
                READ_STEP,
                f"expected {row.expected_columns} fields, found {row.actual_columns}",
                line=int(line_numbers[number - 1]),
                row=int(record_numbers[number - 1]),
                record=clip_record(row.text),
            )
        if table.num_rows != int(keep.sum()):
            raise JunctionError(
                f"{path}: Arrow parsed {table.num_rows} rows where {int(keep.sum())} were expected"
            )
        if table.num_rows:
            yield Batch(table, str(path), pa.array(line_numbers[keep]), pa.array(record_numbers[keep]))

    def _read_csv_whole(self, path: Path, quarantine: Quarantine) -> Iterator[Batch]:
        data = self._read_all(path)
        try:
            text = data.decode(self.spec.encoding)
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise JunctionError(
                f"{path} line {line}: cannot decode as {self.spec.encoding} ({exc.reason}); with "
                "newlines_in_values the file is parsed whole, so a bad line cannot be set aside"
            ) from None
        options = self.spec.csv
        body = io.StringIO(text.removeprefix("\ufeff"))
        for _ in range(options.skip_rows):
            body.readline()
        names = list(options.column_names or [])
        if options.header:
            names = self._csv_fields(body.readline().rstrip("\r\n"))
        rest = body.read().encode("utf-8")
        if not names:
            first = rest.split(b"\n", 1)[0].decode("utf-8")
            names = [f"f{index}" for index in range(len(self._csv_fields(first)))]
        malformed: list[Any] = []

        def skip_malformed(row: Any) -> str:
            malformed.append(row)
            return "skip"

        try:
            table = pa_csv.read_csv(
                pa.BufferReader(rest),
                read_options=pa_csv.ReadOptions(
                    column_names=names, use_threads=False, block_size=len(rest) + 1
                ),
                parse_options=self._csv_parse_options(skip_malformed, newlines_in_values=True),
                convert_options=self._csv_convert_options(names),
            )
        except pa.ArrowException as exc:
            raise JunctionError(f"cannot read {path}: {exc}") from None
        bad_records = {row.number for row in malformed}
        for row in malformed:
            quarantine.add(
                str(path),
                READ_STEP,
                f"expected {row.expected_columns} fields, found {row.actual_columns}",
                row=row.number,
                record=clip_record(row.text),
            )
        total = table.num_rows + len(malformed)
        records = [number for number in range(1, total + 1) if number not in bad_records]
        for start in range(0, table.num_rows, self.batch_size):
            piece = table.slice(start, self.batch_size)
            rows = pa.array(records[start : start + piece.num_rows], pa.int64())
            yield Batch(piece, str(path), pa.nulls(piece.num_rows, pa.int64()), rows)

    # -- JSON Lines --

    def _read_json_lines(self, path: Path, quarantine: Quarantine) -> Iterator[Batch]:
        self._check_line_encoding()
        records_before = 0
        for first_line, raw_chunk in self._line_chunks(path):
            chunk = self._chunk_lines(path, first_line, raw_chunk, records_before, quarantine)
            records_before = chunk.records_after
            if not chunk.usable.any():
                continue
            data, numbers, rows = chunk.fed(chunk.usable)
            table = self._parse_json_lines(data)
            if table is None:  # pyarrow refused the chunk: find the broken lines with the stdlib
                good = chunk.usable.copy()
                for index in np.flatnonzero(chunk.usable):
                    reason = _json_line_problem(chunk.lines[int(index)].as_py().removesuffix(b"\n"))
                    if reason:
                        good[index] = False
                        quarantine.add(
                            str(path), READ_STEP, reason, line=int(chunk.numbers[index]),
                            row=int(chunk.rows[index]), record=clip_record(chunk.line_text(int(index))),
                        )  # fmt: skip
                if not good.any():
                    continue
                data, numbers, rows = chunk.fed(good)
                table = self._parse_json_lines(data)
                if table is None:
                    raise JunctionError(
                        f"{path} lines {numbers[0]}-{numbers[-1]}: the records do not fit one table "
                        "(a field holds values of different types)"
                    )
            yield Batch(table, str(path), pa.array(numbers), pa.array(rows))

    @staticmethod
    def _parse_json_lines(data: pa.Buffer) -> pa.Table | None:
        try:
            return pa_json.read_json(
                pa.BufferReader(data),
                read_options=pa_json.ReadOptions(use_threads=False, block_size=data.size + 1),
            )
        except pa.ArrowException:
            return None

    # -- JSON array --

    def _read_json_array(self, path: Path, quarantine: Quarantine) -> Iterator[Batch]:
        data = self._read_all(path)
        try:
            text = data.decode(self.spec.encoding).removeprefix("\ufeff")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise JunctionError(
                f"{path} line {line}: cannot decode as {self.spec.encoding} ({exc.reason})"
            ) from None
        decoder = json.JSONDecoder()
        whitespace = re.compile(r"\s*")
        resync = re.compile(r"\n\s*\{")
        position = whitespace.match(text).end()
        if not text.startswith("[", position):
            raise JunctionError(f"{path}: expected a JSON array of records ([{{...}}, ...])")
        position += 1
        line, line_counted_to = 1, 0
        records: list[dict[str, Any]] = []
        lines: list[int] = []
        rows: list[int] = []
        record_number = 0

        def line_at(offset: int) -> int:
            nonlocal line, line_counted_to
            line += text.count("\n", line_counted_to, offset)
            line_counted_to = offset
            return line

        while True:
            position = whitespace.match(text, position).end()
            if position >= len(text):
                quarantine.add(str(path), READ_STEP, "the array is not closed with ]", line=line_at(position))
                record_number += 1
                break
            if text[position] == "]":
                break
            start = position
            record_number += 1
            try:
                value, position = decoder.raw_decode(text, position)
                position = whitespace.match(text, position).end()
                if position < len(text) and text[position] not in ",]":
                    raise json.JSONDecodeError("expected ',' or ']' after a record", text, position)
            except json.JSONDecodeError as exc:
                following = resync.search(text, max(exc.pos, start + 1))
                end = following.start() + 1 if following else len(text)
                quarantine.add(
                    str(path),
                    READ_STEP,
                    f"invalid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})",
                    line=line_at(start),
                    row=record_number,
                    record=clip_record(text[start:end].strip()),
                )
                if following is None:
                    break
                position = end
                continue
            if position < len(text) and text[position] == ",":
                position += 1
            if not isinstance(value, dict):
                quarantine.add(
                    str(path), READ_STEP, f"a record must be a JSON object, got {type(value).__name__}",
                    line=line_at(start), row=record_number, record=clip_record(json.dumps(value)),
                )  # fmt: skip
                continue
            records.append(value)
            lines.append(line_at(start))
            rows.append(record_number)
            if len(records) >= self.batch_size:
                yield self._records_batch(path, records, lines, rows)
                records, lines, rows = [], [], []
        if records:
            yield self._records_batch(path, records, lines, rows)

    @staticmethod
    def _records_batch(path: Path, records: list[dict[str, Any]], lines: list[int], rows: list[int]) -> Batch:
        try:
            table = records_table(records)
        except (pa.ArrowException, TypeError) as exc:
            raise JunctionError(
                f"{path} lines {lines[0]}-{lines[-1]}: the records do not fit one table: {exc}"
            ) from None
        return Batch(table, str(path), pa.array(lines, pa.int64()), pa.array(rows, pa.int64()))

    # -- XML --

    def _read_xml(self, path: Path, quarantine: Quarantine) -> Iterator[Batch]:
        data = self._read_all(path)
        survey = XmlSurvey.of(data, self.spec.encoding)
        record_tag = self.spec.xml_record
        if record_tag is None:
            record_tag = survey.record_element()
            if record_tag is None:
                if survey.elements_below_root:
                    raise JunctionError(
                        f"{path}: cannot tell which element is a record ({survey.describe()}): "
                        "set source.xml_record"
                    )
                record_tag = "record"  # nothing below the root: an empty document, read as such
            else:
                self._notes.append(
                    f"{path}: xml_record not set; reading <{record_tag}> elements "
                    f"(repeated {survey.counts[record_tag]:,} times nearest the root)"
                )
        self._xml_reads.append((path, record_tag, survey))
        reader = _XmlRecords(data, record_tag, self.spec.encoding, str(path), quarantine)
        records: list[dict[str, Any]] = []
        lines: list[int] = []
        rows: list[int] = []
        for record, line, row in reader:
            records.append(record)
            lines.append(line)
            rows.append(row)
            if len(records) >= self.batch_size:
                yield self._xml_batch(path, records, lines, rows)
                records, lines, rows = [], [], []
        if records:
            yield self._xml_batch(path, records, lines, rows)

    @staticmethod
    def _xml_batch(path: Path, records: list[dict[str, Any]], lines: list[int], rows: list[int]) -> Batch:
        names = list(dict.fromkeys(name for record in records for name in record))
        columns = {name: pa.array([record.get(name) for record in records], pa.string()) for name in names}
        table = pa.table(columns)
        return Batch(table, str(path), pa.array(lines, pa.int64()), pa.array(rows, pa.int64()))

    # -- Parquet --

    def _read_parquet(self, path: Path, quarantine: Quarantine) -> Iterator[Batch]:
        try:
            parquet = pq.ParquetFile(path)
            next_row = 1
            for record_batch in parquet.iter_batches(batch_size=self.batch_size):
                table = pa.Table.from_batches([record_batch])
                yield Batch.from_table(table, str(path), first_row=next_row)
                next_row += table.num_rows
        except (OSError, pa.ArrowException) as exc:
            raise JunctionError(f"cannot read {path}: {exc}") from None


def re2_escape(text: str) -> str:
    """`text` as a literal in an RE2 pattern (Arrow's regex dialect)."""
    return "".join(f"\\{char}" if not char.isalnum() else char for char in text)


def _valid_utf8(data: bytes) -> bool:
    """Whether `data` is valid UTF-8, checked by Arrow's (SIMD) validator as one string value: several
    times faster than decoding it into a Python str only to throw that away."""
    offsets = pa.py_buffer(np.array([0, len(data)], dtype=np.int64))
    value = pa.LargeStringArray.from_buffers(1, offsets, pa.py_buffer(data))
    try:
        value.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _joined_lines(lines: pa.Array) -> pa.Buffer:
    """Lines that each end with a newline as one buffer: the bytes their offsets span (a filtered
    array's values are contiguous)."""
    _, offsets, data = lines.buffers()
    bounds = np.frombuffer(offsets, dtype=np.int64)
    start, end = int(bounds[lines.offset]), int(bounds[lines.offset + len(lines)])
    return data.slice(start, end - start)


def _json_line_problem(line: bytes) -> str | None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"invalid JSON: {exc.msg} (column {exc.colno})"
    if not isinstance(value, dict):
        return f"a record must be a JSON object, got {type(value).__name__}"
    return None


@dataclass(frozen=True)
class XmlSurvey:
    """Which elements an XML document holds below its root: how often each name occurs and the depth
    (1 = a child of the root) where it first does. Made by a quick expat pass that keeps only names
    (up to the first well-formedness error: a broken file is surveyed as far as it parses)."""

    counts: dict[str, int]
    depths: dict[str, int]

    @classmethod
    def of(cls, data: bytes, encoding: str) -> XmlSurvey:
        counts: dict[str, int] = {}
        depths: dict[str, int] = {}
        depth = 0

        def on_start(name: str, _attributes: dict[str, str]) -> None:
            nonlocal depth
            if depth >= 1:
                counts[name] = counts.get(name, 0) + 1
                depths.setdefault(name, depth)
            depth += 1

        def on_end(_name: str) -> None:
            nonlocal depth
            depth -= 1

        parser = expat.ParserCreate(encoding)
        parser.StartElementHandler = on_start
        parser.EndElementHandler = on_end
        try:
            parser.Parse(data, True)
        except expat.ExpatError:
            pass
        return cls(counts, depths)

    @property
    def elements_below_root(self) -> int:
        return sum(self.counts.values())

    def repeated(self) -> list[str]:
        """Names that occur more than once, nearest the root first, then the most frequent."""
        names = [name for name, count in self.counts.items() if count > 1]
        return sorted(names, key=lambda name: (self.depths[name], -self.counts[name], name))

    def record_element(self) -> str | None:
        """The record element: the repeated element nearest the root (`<cars><car/><car/></cars>` ->
        car); a document with one record has one child of the root, with children of its own."""
        repeated = self.repeated()
        if repeated:
            return repeated[0]
        children = [name for name, depth in self.depths.items() if depth == 1]
        has_fields = any(depth == 2 for depth in self.depths.values())
        return children[0] if len(children) == 1 and has_fields else None

    def describe(self) -> str:
        repeated = self.repeated()[:5]
        if repeated:
            names = ", ".join(f"<{name}> ({self.counts[name]:,})" for name in repeated)
            return f"the file's repeated elements are {names}"
        names = ", ".join(f"<{name}>" for name in list(self.counts)[:5])
        return f"the file's elements are {names}"


class _XmlRecords:
    """Iterate (fields, line, record number) over the `record` elements of an XML document with expat.

    After a well-formedness error the broken record is quarantined and parsing restarts at the next
    ``<record`` start tag, inside a synthetic root element so that the rest still parses.
    """

    RESYNC_ROOT = b"<junction-resync>"

    def __init__(self, data: bytes, record_tag: str, encoding: str, source: str, quarantine: Quarantine):
        self.data = data
        self.record_tag = record_tag
        self.encoding = encoding
        self.source = source
        self.quarantine = quarantine
        self.next_record_tag = re.compile(b"<" + re.escape(record_tag.encode()) + rb"[\s/>]")
        self.record_number = 0

    def __iter__(self) -> Iterator[tuple[dict[str, Any], int, int]]:
        start, prefix = 0, b""
        while True:
            outcome = yield from self._parse_from(start, prefix)
            if outcome is None:
                return
            start, prefix = outcome, self.RESYNC_ROOT

    def _parse_from(self, start: int, prefix: bytes) -> Iterator[tuple[dict[str, Any], int, int]]:
        """Parse from byte `start`; returns where to resume after an error, or None at the end."""
        parser = expat.ParserCreate(self.encoding)
        line_base = self.data.count(b"\n", 0, start)  # lines before `start`
        done: list[tuple[dict[str, Any], int, int]] = []
        state: dict[str, Any] = {
            "record": None,
            "depth": 0,
            "field": None,
            "text": [],
            "line": 0,
            "problem": None,
        }

        def on_start(name: str, attributes: dict[str, str]) -> None:
            if name == self.record_tag and state["record"] is not None and state["depth"] == 0:
                # A record element directly inside a record: the open one was never closed. Quarantine
                # it and read on, else expat nests every following record in it until the document's
                # end and they vanish with it. (Deeper inside a field it is that field's content.)
                self.record_number += 1
                self.quarantine.add(
                    self.source, READ_STEP, f"the <{self.record_tag}> is not closed before the next one",
                    line=state["line"], row=self.record_number,
                    record=clip_record(json.dumps(state["record"], ensure_ascii=False)),
                )  # fmt: skip
                state.update(record=None, problem=None)
            if state["record"] is None:
                if name == self.record_tag:
                    state.update(record=dict(attributes), depth=0, line=line_base + parser.CurrentLineNumber)
                return
            state["depth"] += 1
            if state["depth"] == 1:
                state.update(field=name, text=[])

        def on_text(text: str) -> None:
            if state["record"] is not None and state["depth"] >= 1:
                state["text"].append(text)

        def on_end(name: str) -> None:
            record = state["record"]
            if record is None:
                return
            if state["depth"] == 0:
                self.record_number += 1
                if not record and not state["problem"]:
                    state["problem"] = "the record has no fields"
                if state["problem"]:
                    self.quarantine.add(
                        self.source, READ_STEP, state["problem"], line=state["line"], row=self.record_number,
                        record=clip_record(json.dumps(record, ensure_ascii=False)),
                    )  # fmt: skip
                else:
                    done.append((record, state["line"], self.record_number))
                state.update(record=None, problem=None)
                return
            if state["depth"] == 1:
                value = "".join(state["text"]).strip() or None
                if state["field"] in record:
                    state["problem"] = f"repeated element <{state['field']}> (lists are not supported)"
                record[state["field"]] = value
            state["depth"] -= 1

        parser.StartElementHandler = on_start
        parser.EndElementHandler = on_end
        parser.CharacterDataHandler = on_text
        parser.buffer_text = True
        feed = prefix + self.data[start:]
        try:
            for offset in range(0, len(feed), READ_BLOCK_BYTES):
                parser.Parse(feed[offset : offset + READ_BLOCK_BYTES], False)
                yield from done
                done.clear()
            parser.Parse(b"", True)
            yield from done
            return None
        except expat.ExpatError as exc:
            yield from done
            error_at = start + max(parser.ErrorByteIndex - len(prefix), 0)
            line = line_base + exc.lineno
            column = exc.offset + 1
            if exc.lineno == 1 and start:  # the feed began mid-line, behind the resync prefix
                column = error_at - (self.data.rfind(b"\n", 0, error_at) + 1) + 1
            following = self.next_record_tag.search(self.data, error_at + 1)
            if state["record"] is not None:
                self.record_number += 1
                self.quarantine.add(
                    self.source,
                    READ_STEP,
                    f"malformed XML: {expat.ErrorString(exc.code)} (line {line} column {column})",
                    line=state["line"],
                    row=self.record_number,
                    record=clip_record(self._text_between(self._record_start(error_at), following)),
                )
            elif following is not None or not self._only_closing_tags_after(error_at):
                self.record_number += 1
                self.quarantine.add(
                    self.source,
                    READ_STEP,
                    f"malformed XML outside a <{self.record_tag}> record: {expat.ErrorString(exc.code)} "
                    f"(line {line} column {column})",
                    line=line,
                    row=self.record_number,
                )
            return following.start() if following else None

    def _text_between(self, start: int, following: re.Match[bytes] | None) -> str:
        end = following.start() if following else len(self.data)
        return self.data[start:end].decode(self.encoding, "replace").strip()

    def _record_start(self, error_at: int) -> int:
        previous = None
        for match in self.next_record_tag.finditer(self.data, 0, error_at + 1):
            previous = match
        return previous.start() if previous else error_at

    def _only_closing_tags_after(self, error_at: int) -> bool:
        """After a resync the original root's closing tag is an expected error, not a broken record."""
        # expat points inside the tag it stumbled on (after "</"): start from that tag's "<".
        tag_start = max(self.data.rfind(b"<", 0, error_at + 1), 0)
        return re.fullmatch(rb"(\s*</[^>]+>)*\s*", self.data[tag_start:]) is not None
