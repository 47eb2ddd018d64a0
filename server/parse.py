"""Ingest bodies decoded with bounded memory: about 4x a body's size at most, whatever it holds.

Why: `orjson.loads` builds one Python object per JSON value before the schema can look at
it. `{"step": [0], "pre_norm": [{}, {}, ...]}` is one 64-byte dict (plus an 8-byte slot) per
3 bytes, so a 32 MiB body took ~1 GB to be refused; even a valid column costs 8 to 32 bytes
of objects per number on top of its numpy array. Here a body is read in two steps:

1. its skeleton: the keys of the top-level object and where each value starts and ends,
   found with regular expressions (C speed, no object per value). A column must be a flat
   list (nothing nested in it) to be read at all;
2. the values, in the order and with the checks of `schemas.parse_batch` (the same
   functions): a column of up to PIECE_BYTES of text is decoded whole (as before, so the
   usual 2,000-step batch is stored exactly as before); a longer one PIECE_BYTES at a time
   (orjson on a slice, then numpy) into one array of the batch's length, indexes counted
   over the whole column. Free-form parts (`meta`, `events`, an unknown key's value) are
   decoded only when a count of their tokens says they fit (`_cost`).

A refused body under SMALL_BODY is read again by the whole-document reference
(`orjson.loads` + `schemas.parse_batch`), so its answer is word for word the reference's
(a syntax error anywhere is named before a bad value); a refusal costs at most a few MB
there. A larger body is refused with the first error found (same status, the same message
for the same fault, but which of two faults is named may differ from the reference).
"""
from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np
import orjson

from gradwatch.server import schemas as S
from gradwatch.server.schemas import BatchError

SMALL_BODY = 64 * 1024       # below: a refusal is worded by the whole-document reference
PIECE_BYTES = 64 * 1024      # a column longer than this is decoded this much text at a time
WALK_TOKENS = 400_000        # most brackets and strings walked to find where a free-form value ends
NESTED_WALK = 4_096          # the same, for a column holding lists or objects (refused either way)
NESTED_BYTES = 4_096         # such a column up to this long is decoded, to be named as the reference does
FREEFORM_SLACK = 16 * 1024 * 1024  # free-form JSON may cost max(this, 2x the body's size) decoded

__all__ = ["SMALL_BODY", "PIECE_BYTES", "load_batch", "load_message"]


def _both(pattern: str) -> dict[type, re.Pattern]:
    return {str: re.compile(pattern), bytes: re.compile(pattern.encode())}


_STRING_BODY = r'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
_RE = {
    "ws": _both(r"[ \t\n\r]*+"),
    "string": _both(_STRING_BODY),
    # a list with no list or object inside: numbers, literals and strings (which may hold brackets)
    "flat": _both(r'\[(?:[^\[\]{}"]++|' + _STRING_BODY + r")*+\]"),
    "flat_prefix": _both(r'\[(?:[^\[\]{}"]++|' + _STRING_BODY + r")*+"),
    "rows_close": _both(r"\][ \t\n\r]*+\]"),  # searched for: a literal first character is fast
    "rows": _both(r'\[[ \t\n\r]*+(?:\[(?:[^\[\]{}"]++|' + _STRING_BODY + r')*+\][ \t\n\r]*+'
                  r'(?:,[ \t\n\r]*+\[(?:[^\[\]{}"]++|' + _STRING_BODY + r')*+\][ \t\n\r]*+)*+)?\]'),
    "structure": _both(r'[\[\]{}]|' + _STRING_BODY + r'|"'),  # a bracket, a string, or a lone quote
    "scalar": _both(r'[^ \t\n\r,:\[\]{}"]++'),
}
_TYPE_BY_FIRST = {"{": "dict", "[": "list", '"': "str", "t": "bool", "f": "bool", "n": "NoneType"}


class _TooLong(Exception):
    """A free-form value with more than the walk's budget of brackets and strings."""

    def __init__(self, depth: int):
        self.depth = depth


class _Doc:
    """The body, with the few scanning steps the readers need (bytes or str alike)."""

    def __init__(self, data: bytes | str):
        if isinstance(data, memoryview):
            data = bytes(data)  # bytes, bytearray (an HTTP body as read) and str are read in place
        self.data = data
        self.n = len(data)
        kind = str if isinstance(data, str) else bytes
        self.re = {name: patterns[kind] for name, patterns in _RE.items()}
        self.view = memoryview(data) if kind is bytes else data  # zero-copy slices for orjson
        self.tok = (lambda text: text) if kind is str else (lambda text: text.encode())
        self.comma, self.quote, self.bslash = self.tok(","), self.tok('"'), self.tok("\\")
        self.rbracket = self.tok("]")

    def at(self, i: int) -> str:
        """The character at `i` ("\x00" past the end, which no test below accepts)."""
        char = self.data[i:i + 1]
        if not char:
            return "\x00"
        return char if isinstance(char, str) else char.decode("latin-1")

    def fail(self, i: int, what: str) -> BatchError:
        return BatchError(f"invalid JSON: {what} at char {i}")

    def ws(self, i: int) -> int:
        return self.re["ws"].match(self.data, i).end()

    def expect(self, i: int, char: str, what: str) -> int:
        if self.at(i) != char:
            raise self.fail(i, f"expected {what}")
        return i + 1

    def string_end(self, i: int) -> int:
        match = self.re["string"].match(self.data, i)
        if match is None:
            raise self.fail(i, "unterminated string")
        return match.end()

    def has(self, char: str, start: int, end: int) -> bool:
        return self.data.find(self.tok(char), start, end) != -1

    def flat_end(self, i: int) -> int | None:
        """Where the list at `i` ends when nothing is nested in it; None when something is.

        The first "]" ends it when no "[", "{" comes before it and it is outside strings
        (`find`/`count` run at memchr speed; a regex over every byte is ~15 ns a byte);
        strings with brackets or escapes are left to the string-aware regex."""
        close = self.data.find(self.rbracket, i + 1)
        if close == -1:
            raise self.fail(self.n, "unexpected end of data")
        if not self.has("[", i + 1, close) and not self.has("{", i + 1, close):
            if not self.has('"', i + 1, close):
                return close + 1
            if not self.has("\\", i + 1, close) and self.data.count(self.quote, i + 1, close) % 2 == 0:
                return close + 1
        match = self.re["flat"].match(self.data, i)
        return match.end() if match is not None else None

    def rows_end(self, i: int) -> int | None:
        """Where the list of rows at `i` ends (per-tensor norms: flat lists of numbers); None
        when it is not one. Without strings the first "]]" ends it (a nested row found later
        is refused when its piece is read); with strings, the string-aware regex."""
        j = self.ws(i + 1)
        if self.at(j) == "]":
            return j + 1
        close = self.re["rows_close"].search(self.data, j)
        if close is None:
            raise self.fail(self.n, "unexpected end of data")
        if not self.has('"', i, close.end()) and not self.has("{", i, close.end()):
            return close.end()
        match = self.re["rows"].match(self.data, i)
        return match.end() if match is not None else None

    def load(self, start: int, end: int) -> Any:
        try:
            return orjson.loads(self.view[start:end])
        except orjson.JSONDecodeError as error:
            raise self.fail(start + error.pos, error.msg) from None

    def load_list(self, start: int, end: int) -> list:
        """The list items written in data[start:end] (no brackets), decoded."""
        text = self.data[start:end]
        text = ("[" + text + "]") if isinstance(text, str) else (b"[" + text + b"]")
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError as error:
            raise self.fail(start - 1 + error.pos, error.msg) from None

    def type_name(self, start: int, end: int) -> str:
        """`type(value).__name__` of the value at data[start:end], without decoding a large one."""
        if end - start <= 4096:
            return type(self.load(start, end)).__name__
        first = self.at(start)
        if first in _TYPE_BY_FIRST:
            return _TYPE_BY_FIRST[first]
        text = self.at(start) + self.at(end - 1)
        return "float" if any(c in text for c in ".eE") else "int"

    def value_end(self, i: int, budget: int = WALK_TOKENS) -> int:
        """Where the JSON value at `i` ends, walking only its brackets and strings (a list of
        numbers is one regex match); _TooLong past `budget` of them. The text between is
        checked by orjson when the value is decoded, or not at all when it is refused anyway."""
        first = self.at(i)
        if first == '"':
            return self.string_end(i)
        if first not in "[{":
            match = self.re["scalar"].match(self.data, i)
            if match is None:
                raise self.fail(i, "expected a value")
            return match.end()
        depth = deepest = 0
        opening, closing = self.tok("[{"), self.tok("]}")
        for match in self.re["structure"].finditer(self.data, i):
            budget -= 1
            if budget < 0:
                raise _TooLong(deepest)
            token = match.group()
            if len(token) > 1:
                continue  # a string
            if token in opening:
                depth += 1
                deepest = max(deepest, depth)
            elif token in closing:
                depth -= 1
                if depth == 0:
                    return match.end()
            else:
                raise self.fail(match.start(), "unterminated string")
        raise self.fail(self.n, "unexpected end of data")

    def members(self, i: int, value_end: Callable[[str, int], int]) -> tuple[dict[str, tuple[int, int]], int]:
        """The object at `i` as {key: (value start, value end)} and where it ends; a repeated
        key keeps its last value (as orjson does)."""
        i = self.ws(self.expect(i, "{", "'{'"))
        out: dict[str, tuple[int, int]] = {}
        if self.at(i) == "}":
            return out, i + 1
        while True:
            if self.at(i) != '"':
                raise self.fail(i, "expected a key")
            end = self.string_end(i)
            key = self.load(i, end)
            i = self.ws(self.expect(self.ws(end), ":", "':'"))
            end = value_end(key, i)
            out[key] = (i, end)
            i = self.ws(end)
            char = self.at(i)
            if char == "}":
                return out, i + 1
            i = self.ws(self.expect(i, ",", "',' or '}'"))

    def end_of_document(self, i: int) -> None:
        i = self.ws(i)
        if i != self.n:
            raise self.fail(i, "trailing characters")

    def pieces(self, lo: int, hi: int, after: bytes | str | None = None):
        """The items written in data[lo:hi] (a flat list's inside) as lists of about
        PIECE_BYTES of text each: cut at a comma outside strings (or, with `after` = "]",
        at a comma following a row's closing bracket)."""
        data, quote = self.data, self.quote
        if data.find(self.bslash, lo, hi) != -1:
            raise _Escape(data.find(self.bslash, lo, hi))
        quotes = data.find(quote, lo, hi) != -1
        pos = lo
        while True:
            cut = hi
            if hi - pos > PIECE_BYTES:
                cut = self._next_cut(pos + PIECE_BYTES, hi, after)
                if quotes:
                    odd = data.count(quote, pos, cut) % 2
                    while odd and cut < hi:
                        following = self._next_cut(cut + 1, hi, after)
                        odd ^= data.count(quote, cut, following) % 2
                        cut = following
            if after is not None and cut - pos > 2 * PIECE_BYTES and (
                    self.has("{", pos, cut) or self.has('"', pos, cut)):
                raise _RowTooLong()  # one huge row of objects or strings: refused unread
            items = self.load_list(pos, cut)
            if not items and (pos != lo or cut != hi):
                raise self.fail(pos, "expected a value")
            yield items
            if cut >= hi:
                return
            pos = cut + 1

    def _next_cut(self, start: int, hi: int, after) -> int:
        if after is None:
            cut = self.data.find(self.comma, start, hi)
            return hi if cut == -1 else cut
        while True:  # the comma after a row: "]" then blanks then ","
            close = self.data.find(self.rbracket, start, hi)
            if close == -1:
                return hi
            cut = self.ws(close + 1)
            if cut < hi and self.at(cut) == ",":
                return cut
            start = close + 1


class _RowTooLong(Exception):
    """A row of per-tensor norms longer than two pieces that holds objects or strings."""


class _Escape(Exception):
    """A string with a backslash escape inside a column: no allowed string needs one."""

    def __init__(self, at: int):
        self.at = at


# ----- batches -----

def _kind(name: str) -> str:
    return "step" if name == "step" else "bool" if name in S.BOOL_FIELDS else "float"


class _BatchReader:
    """One batch object: its skeleton first (`members`), then its columns in the schema's order."""

    def __init__(self, doc: _Doc, start: int):
        self.doc = doc
        self.start = start
        self.flat: dict[str, bool] = {}
        self.raw_budget = 0
        self.tensor_fields: dict | None = None
        if doc.at(start) != "{":  # only the top level: a message's batch is read when it is "{"
            raise BatchError(f"a batch must be a JSON object of columns, got {doc.type_name(start, doc.n)}")
        self.fields, self.end = doc.members(start, self._value_end)

    def _value_end(self, key: str, i: int) -> int:
        doc = self.doc
        if key not in S.BATCH_KEYS:  # refused whatever it holds: not read any further
            raise BatchError(f"unknown field '{key}'")
        if key in S.COLUMNS and doc.at(i) == "[":
            end = doc.flat_end(i)
            if end is not None:
                self.flat[key] = True
                return end
            self.flat[key] = False
            try:
                return doc.value_end(i, NESTED_WALK)
            except _TooLong:
                raise self._nested_error(key, i) from None
        if key == "tensor_norms" and doc.at(i) == "{":
            self.tensor_fields, end = self._tensor_members(i)
            return end
        try:
            return doc.value_end(i)
        except _TooLong:
            raise BatchError(f"field '{key}' is too large to read") from None

    def _tensor_members(self, i: int) -> tuple[dict | None, int]:
        """The skeleton of `tensor_norms`: names as a flat list, norms as a list of rows;
        None (refused when read) for any other shape."""
        doc = self.doc
        shaped = True

        def value_end(key: str, j: int) -> int:
            nonlocal shaped
            end = None
            if key == "names" and doc.at(j) == "[":
                end = doc.flat_end(j)
            elif key == "norms" and doc.at(j) == "[":
                end = doc.rows_end(j)
            if end is None:
                shaped = False
                try:
                    end = doc.value_end(j)
                except _TooLong:
                    raise BatchError("field 'tensor_norms' must be an object with 'names' and 'norms'") from None
            return end

        fields, end = doc.members(i, value_end)
        return (fields if shaped else None), end

    def batch(self) -> S.Batch:
        fields = self.fields
        unknown = sorted(key for key in fields if key not in S.BATCH_KEYS)
        if unknown:
            raise BatchError(f"unknown field '{unknown[0]}'")
        for required in S.REQUIRED_FIELDS:
            if required not in fields:
                raise BatchError(f"missing required column '{required}'")
        steps = self._steps(*fields["step"])
        arrays = 8 * len(steps) * (1 + sum(name in fields for name in S.VALUE_COLUMNS))
        self.raw_budget = 4 * self.doc.n - arrays
        columns: dict[str, S.Column] = {}
        for name in S.VALUE_COLUMNS:
            if name in fields:
                columns[name] = self._column(name, *fields[name], len(steps))
                S._refuse_null_pre_norm(name, columns[name])
        for name in S.NORM_FIELDS:
            if name in columns:
                S._refuse_negative(name, columns[name].values)
        batch = S.Batch(steps=steps, columns=columns)
        if "tensor_norms" in fields and self.doc.at(fields["tensor_norms"][0]) != "n":
            batch.tensor_names, batch.tensor_norms = self._tensor_norms(*fields["tensor_norms"], len(steps))
            S._refuse_negative("tensor_norms.norms", batch.tensor_norms)
        return batch

    # -- columns --

    def _whole(self, name: str, start: int, end: int) -> bool:
        """Whether to decode the column in one go: short, or refused anyway (not a flat list)."""
        return end - start <= PIECE_BYTES or not self.flat.get(name, False)

    def _as_list_error(self, name: str, start: int, end: int) -> BatchError:
        return BatchError(f"column '{name}' must be a list, got {self.doc.type_name(start, end)}")

    def _steps(self, start: int, end: int) -> np.ndarray:
        doc = self.doc
        if doc.at(start) != "[":
            raise self._as_list_error("step", start, end)
        if self._whole("step", start, end):
            if not self.flat["step"] and end - start > NESTED_BYTES:
                raise self._nested_error("step", start)
            return S._parse_steps(doc.load(start, end))
        upper = doc.data.count(doc.comma, start, end) + 1
        steps = np.empty(upper, dtype=np.int64)
        count, bool_error = 0, None
        for items in self._pieces("step", start, end):
            part = S._step_array(items)
            steps[count:count + len(part)] = part
            if bool_error is None:
                bool_error = S._step_bool_error(items, part, count)
            count += len(part)
        steps = steps[:count]
        S._check_step_range(steps)
        if bool_error is not None:
            raise bool_error
        S._check_step_repeats(steps)
        return steps

    def _column(self, name: str, start: int, end: int, n_steps: int) -> S.Column:
        doc = self.doc
        if doc.at(start) != "[":
            raise self._as_list_error(name, start, end)
        if self._whole(name, start, end):
            if not self.flat[name] and end - start > NESTED_BYTES:
                raise self._nested_error(name, start)
            values = doc.load(start, end)
            if len(values) != n_steps:
                raise BatchError(f"column '{name}' has {len(values)} values, 'step' has {n_steps}")
            column = S._parse_column(name, values)
            # `raw` (the decoded list, bound as it is by SQLite ingest, which saves a
            # `tolist()`) is kept while the lists kept and the arrays fit in 4x the body:
            # always for the usual 2,000-step batch, not for a million short numbers
            if column.raw is not None:
                self.raw_budget -= len(values) * (8 if name in S.BOOL_FIELDS else 36)
                if self.raw_budget < 0:
                    column.raw = None
            return column
        values = np.empty(n_steps, dtype=np.float64)
        missing = None
        count = 0
        for items in self._pieces(name, start, end):
            if count + len(items) <= n_steps:
                # a bad item is named at once (the reference names a wrong length first; a
                # long column is not read to its end to count it when it is refused anyway)
                part = S._parse_column(name, items, count)
                values[count:count + len(items)] = part.values
                if part.missing is not None:
                    if missing is None:
                        missing = np.zeros(n_steps, dtype=bool)
                    missing[count:count + len(items)] = part.missing
            count += len(items)
        if count != n_steps:
            raise BatchError(f"column '{name}' has {count} values, 'step' has {n_steps}")
        return S.Column(values, missing)

    def _pieces(self, name: str, start: int, end: int, after=None):
        try:
            yield from self.doc.pieces(start + 1, end - 1, after)
        except _RowTooLong:
            raise BatchError("field 'tensor_norms.norms' holds a row too long to read that is not "
                             "all numbers") from None
        except _Escape as escape:
            where = "field 'tensor_norms.norms'" if name == "tensor_norms.norms" else f"column '{name}'"
            raise BatchError(f"{where} holds a string with a backslash escape (char {escape.at}); "
                             f"strings allowed are 'NaN', 'Infinity', '-Infinity'") from None

    def _nested_error(self, name: str, start: int) -> BatchError:
        """A column holding a list or an object (a refusal, found without decoding it): the
        items before it are checked as usual, then it is named with its index."""
        doc = self.doc
        nested = doc.re["flat_prefix"].match(doc.data, start).end()
        index = 0
        comma = doc.data.rfind(doc.comma, start + 1, nested)
        if comma != -1:
            for items in self._pieces(name, start, comma + 1):
                if _kind(name) == "step":
                    S._step_array(items)
                else:
                    S._parse_column(name, items, index)
                index += len(items)
        elif doc.ws(start + 1) != nested:
            raise doc.fail(doc.ws(start + 1), "expected ',' or ']'")
        if doc.at(nested) not in "[{":
            raise doc.fail(nested, "unexpected character")
        try:
            shown = repr(doc.load(nested, doc.value_end(nested, NESTED_WALK)))
        except (_TooLong, BatchError):
            shown = "[...]" if doc.at(nested) == "[" else "{...}"
        if _kind(name) == "step":
            return BatchError(f"column 'step' must hold integers, got {shown}")
        if _kind(name) == "bool":
            return BatchError(f"column '{name}' must hold booleans, got {shown} at index {index}")
        got = "list" if doc.at(nested) == "[" else "dict"
        return BatchError(f"column '{name}' must hold numbers, got {got} at index {index}")

    # -- per-tensor norms --

    def _tensor_norms(self, start: int, end: int, n_steps: int) -> tuple[list[str], np.ndarray]:
        doc = self.doc
        shape = "field 'tensor_norms' must be an object with 'names' and 'norms'"
        if end - start <= PIECE_BYTES:
            return S._parse_tensor_norms(doc.load(start, end), n_steps)
        fields = self.tensor_fields
        if fields is None or set(fields) != {"names", "norms"}:
            if end - start <= NESTED_BYTES:
                return S._parse_tensor_norms(doc.load(start, end), n_steps)
            raise BatchError(shape)
        names_start, names_end = fields["names"]
        if _cost(doc, names_start, names_end) > _freeform_allowance(doc):
            raise BatchError("field 'tensor_norms.names' holds too many names to read")
        names = S._tensor_names(doc.load(names_start, names_end))
        rows_start, rows_end = fields["norms"]
        if rows_end - rows_start <= PIECE_BYTES:
            rows = doc.load(rows_start, rows_end)
            if not isinstance(rows, list) or len(rows) != n_steps:
                raise S._rows_error(n_steps, rows)
            return names, S._norm_rows(rows, len(names))
        if doc.at(rows_start) != "[":
            raise BatchError(f"field 'tensor_norms.norms' must have one row per step ({n_steps}), "
                             f"got {doc.type_name(rows_start, rows_end)}")
        norms = np.empty((n_steps, len(names)), dtype=np.float32)
        count = 0
        for rows in self._pieces("tensor_norms.norms", rows_start, rows_end, after="]"):
            if count + len(rows) <= n_steps:
                norms[count:count + len(rows)] = S._norm_rows(rows, len(names), count)
            count += len(rows)
        if count != n_steps:
            raise BatchError(f"field 'tensor_norms.norms' must have one row per step ({n_steps}), got {count}")
        return names, norms


def _cost(doc: _Doc, start: int, end: int) -> int:
    """About the most orjson builds for data[start:end], in bytes, from C-speed counts (nothing
    is built): per list or object 72 (the container and its slot), per key 32 (its entry: short
    keys are cached), per other string 64 plus its text, per other item (a number) 40."""
    data, tok = doc.data, doc.tok
    containers = data.count(tok("{"), start, end) + data.count(tok("["), start, end)
    keys = data.count(tok(":"), start, end)
    strings = max(0, data.count(tok('"'), start, end) // 2 - keys)
    items = data.count(tok(","), start, end) + 1
    return 72 * containers + 32 * keys + 64 * strings + 40 * items + (end - start)


def _freeform_allowance(doc: _Doc) -> int:
    return max(FREEFORM_SLACK, 2 * doc.n)


def _reference_batch(data: bytes | str) -> S.Batch:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise BatchError(f"invalid JSON: {error}") from None
    return S.parse_batch(obj)


def read_batch(data: bytes | str) -> S.Batch:
    """`load_batch` without the reference's wording for small refusals (tests compare the two)."""
    doc = _Doc(data)
    start = doc.ws(0)
    if start >= doc.n:
        raise doc.fail(start, "unexpected end of data")
    reader = _BatchReader(doc, start)
    doc.end_of_document(reader.end)
    return reader.batch()


def load_batch(data: bytes | bytearray | str) -> S.Batch:
    """A `POST /api/runs/{run}/steps` body -> a validated Batch (BatchError: 422 naming the fault)."""
    try:
        return read_batch(data)
    except BatchError:
        if len(data) <= SMALL_BODY:
            return _reference_batch(data)
        raise


# ----- WebSocket messages -----

def read_message(data: bytes | str) -> tuple[Any, S.IngestMessage]:
    """`load_message` without the reference's wording for small refusals."""
    doc = _Doc(data)
    start = doc.ws(0)
    if start >= doc.n:
        raise doc.fail(start, "unexpected end of data")
    if doc.at(start) != "{":
        raise BatchError("a message must be a JSON object")
    readers: dict[str, _BatchReader] = {}
    seen = {"seq": None}

    def value_end(key: str, i: int) -> int:
        if key not in S.MESSAGE_KEYS:  # refused whatever it holds: not read any further
            raise BatchError(f"unknown field '{key}' in the message")
        if key == "batch" and doc.at(i) == "{":
            readers[key] = _BatchReader(doc, i)
            return readers[key].end
        try:
            end = doc.value_end(i)
            if key == "seq":  # decoded at once: a refusal found further on still names it
                seen["seq"] = S.message_seq({"seq": doc.load(i, end) if end - i <= 4096 else None})
            return end
        except _TooLong as long:
            if key == "meta" and long.depth > S.MAX_JSON_DEPTH:
                raise BatchError(f"field 'meta' nests deeper than {S.MAX_JSON_DEPTH} levels") from None
            raise BatchError(f"field '{key}' is too large to read") from None

    try:
        fields, end = doc.members(start, value_end)
        doc.end_of_document(end)
    except BatchError as error:
        error.seq = seen["seq"]
        raise

    def small(key: str, limit: int = 4096) -> Any:
        """The value of `key` when short enough to matter (a longer one is refused anyway)."""
        if key not in fields:
            return None
        a, b = fields[key]
        return doc.load(a, b) if b - a <= limit else _Long(doc.type_name(a, b))

    seq = seen["seq"]
    try:
        unknown = sorted(set(fields) - S.MESSAGE_KEYS)
        if unknown:
            raise BatchError(f"unknown field '{unknown[0]}' in the message")
        kind = small("type")
        if kind != "batch":
            raise BatchError(f"field 'type' must be 'batch', got {kind!r}")
        run = S.validate_run_name(small("run", 8192))
        batch = None
        if "batch" in readers:
            batch = readers["batch"].batch()
        elif "batch" in fields and doc.at(fields["batch"][0]) != "n":
            a, b = fields["batch"]
            raise BatchError(f"a batch must be a JSON object of columns, got {doc.type_name(a, b)}")
        meta = _freeform(doc, fields, "meta")
        if meta is not None and not isinstance(meta, dict):
            raise BatchError("field 'meta' must be an object")
        if meta is not None:
            S.check_json("meta", meta, S.MAX_META_BYTES)
        events = S.parse_events(_freeform(doc, fields, "events"))
    except BatchError as error:
        error.seq = seq
        raise
    return seq, S.IngestMessage(seq, run, batch, meta, events)


class _Long:
    """Stands for a long scalar that was not decoded (its repr names its type)."""

    def __init__(self, type_name: str):
        self.type_name = type_name

    def __repr__(self) -> str:
        return f"<a long {self.type_name}>"


def _freeform(doc: _Doc, fields: dict, key: str) -> Any:
    if key not in fields:
        return None
    start, end = fields[key]
    if _cost(doc, start, end) > _freeform_allowance(doc):
        limit = S.MAX_META_BYTES if key == "meta" else None
        more = f", more than {limit} bytes as JSON" if limit else ""
        raise BatchError(f"field '{key}' is {end - start} bytes as sent{more}: too large to read")
    return doc.load(start, end)


def _reference_message(data: bytes | str) -> tuple[Any, S.IngestMessage]:
    seq = None
    try:
        decoded = orjson.loads(data)
        seq = S.message_seq(decoded)
        return seq, S.parse_ingest_message(decoded)
    except orjson.JSONDecodeError as error:
        refused = BatchError(f"invalid JSON: {error}")
        refused.seq = seq
        raise refused from None
    except BatchError as error:
        error.seq = seq
        raise


def load_message(data: bytes | str) -> tuple[Any, S.IngestMessage]:
    """A `/ws/ingest` message -> (its seq, the validated message); a BatchError carries `seq`
    (the message's, for the error reply; None when it has none or it could not be read)."""
    try:
        return read_message(data)
    except BatchError as error:
        if len(data) <= SMALL_BODY:
            return _reference_message(data)
        if not hasattr(error, "seq"):
            error.seq = None
        raise
