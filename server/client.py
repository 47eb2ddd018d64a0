"""A small JSON client for the server's REST API, shared by the CLI commands that read
from a running server (`recommend`, `report`, `demo`). Standard library only.

Every failure becomes an `ApiError` whose message is one line a user can act on:
the server is unreachable, the token was refused, or the server's own `detail`.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class ApiError(Exception):
    """One line saying why a request failed; `status` is the HTTP status, None when unreachable."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def run_path(run: str, tail: str = "") -> str:
    """`/api/runs/<run><tail>` with the run name quoted (names are data, not paths)."""
    return f"/api/runs/{urllib.parse.quote(run, safe='')}{tail}"


class ApiClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

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
            raise ApiError(self._http_reason(error, path), error.code) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ApiError(f"cannot reach the server at {self.url}: {reason}") from None

    def _http_reason(self, error: urllib.error.HTTPError, path: str) -> str:
        try:
            detail = json.loads(error.read()).get("detail")
        except Exception:
            detail = error.reason
        if error.code in (401, 403):
            kind, variable = ("write", "GRADWATCH_TOKEN") if error.code and "write" in str(detail) else \
                ("read", "GRADWATCH_READ_TOKEN")
            return (f"the server at {self.url} refused the {kind} token ({error.code}: {detail}); "
                    f"pass --token or set {variable}")
        return f"{error.code} from {self.url}{path}: {detail}"
