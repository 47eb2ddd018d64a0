"""A small JSON client for the server's REST API, shared by the CLI commands that read
from a running server (`recommend`, `report`, `demo`). Standard library only.

Every failure becomes an `ApiError` whose message is one line a user can act on:
the server is unreachable, the token was refused, or the server's own `detail`
(a validation error's list of problems turned into one sentence naming each field
and its limit, see `detail_in_words`).
"""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Mapping


class ApiError(Exception):
    """One line saying why a request failed; `status` is the HTTP status, None when unreachable."""

    def __init__(self, message: str, status: int | None = None, detail: Any = None):
        super().__init__(message)
        self.status = status
        self.detail = detail  # the server's `detail`, as sent


# pydantic's error types (the `type` of each item of a 422 `detail`) as words; `{limit}` is the
# value in the item's `ctx`.
_LIMITS = {
    "greater_than_equal": ("ge", "must be at least {limit}"),
    "greater_than": ("gt", "must be greater than {limit}"),
    "less_than_equal": ("le", "must be at most {limit}"),
    "less_than": ("lt", "must be less than {limit}"),
    "multiple_of": ("multiple_of", "must be a multiple of {limit}"),
    "string_too_short": ("min_length", "must be at least {limit} characters long"),
    "string_too_long": ("max_length", "must be at most {limit} characters long"),
    "too_short": ("min_length", "must have at least {limit} items"),
    "too_long": ("max_length", "must have at most {limit} items"),
}
_KINDS = {
    "int_parsing": "must be a whole number", "int_from_float": "must be a whole number",
    "int_type": "must be a whole number", "float_parsing": "must be a number", "float_type": "must be a number",
    "finite_number": "must be a finite number", "bool_parsing": "must be true or false",
    "missing": "is required",
}


def _limit_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def detail_in_words(detail: Any, names: Mapping[str, str] | None = None) -> str:
    """A server's error `detail` as one sentence. FastAPI's 422 `detail` is a list of
    pydantic errors (`{"type": "greater_than_equal", "loc": ["query", "window"], "input":
    "50", "ctx": {"ge": 100}}`): each becomes "window must be at least 100 (got 50)".
    `names` renames fields for the reader (e.g. `{"window": "--window"}` on the command line).
    A string `detail` is returned as it is."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, dict) and isinstance(detail.get("message") or detail.get("detail"), str):
        return detail.get("message") or detail.get("detail")
    if not isinstance(detail, list) or not detail:
        return str(detail)
    names = names or {}
    parts = []
    for problem in detail:
        if not isinstance(problem, dict):
            parts.append(str(problem))
            continue
        where = [str(part) for part in problem.get("loc", []) if part not in ("query", "body", "path", "header")]
        field = ".".join(where) or "the request"
        field = names.get(field, field)
        kind = problem.get("type", "")
        context = problem.get("ctx") or {}
        if kind in _LIMITS and _LIMITS[kind][0] in context:
            key, text = _LIMITS[kind]
            words = text.format(limit=_limit_text(context[key]))
        elif kind in _KINDS:
            words = _KINDS[kind]
        else:
            words = "is not valid: " + str(problem.get("msg", kind)).removeprefix("Value error, ")
        given = problem.get("input")
        got = f" (got {given})" if given is not None and kind != "missing" and not isinstance(given, (dict, list)) \
            else ""
        parts.append(f"{field} {words}{got}")
    return "; ".join(parts) + "."


def run_path(run: str, tail: str = "") -> str:
    """`/api/runs/<run><tail>` with the run name quoted (names are data, not paths)."""
    return f"/api/runs/{urllib.parse.quote(run, safe='')}{tail}"


class ApiClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0,
                 names: Mapping[str, str] | None = None):
        """`names`: how the reader knows the query parameters (`{"window": "--window"}`),
        used when a 422 is put in words."""
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.names = dict(names or {})

    def get(self, path: str, **query: Any) -> Any:
        """GET `path` with the non-None `query` parameters; the decoded JSON answer."""
        return self.request("GET", path, **query)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def request(self, method: str, path: str, **query: Any) -> Any:
        params = {key: value for key, value in query.items() if value is not None}
        address = self.url + path + (("?" + urllib.parse.urlencode(params)) if params else "")
        request = urllib.request.Request(address, headers={"Accept": "application/json"}, method=method)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as error:
            try:
                detail = json.loads(error.read()).get("detail")
            except Exception:
                detail = error.reason
            raise ApiError(self._http_reason(error.code, detail, path), error.code, detail) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ApiError(f"cannot reach the server at {self.url}: {reason}") from None

    def _http_reason(self, code: int, detail: Any, path: str) -> str:
        if code in (401, 403):
            kind, variable = ("write", "GRADWATCH_TOKEN") if "write" in str(detail) else \
                ("read", "GRADWATCH_READ_TOKEN")
            return (f"the server at {self.url} refused the {kind} token ({code}: {detail}); "
                    f"pass --token or set {variable}")
        if code == 422:
            return detail_in_words(detail, self.names)
        return f"{code} from {self.url}{path}: {detail_in_words(detail, self.names)}"
