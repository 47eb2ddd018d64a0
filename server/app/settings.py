"""Settings: one pydantic-settings class per side, the only place defaults live.

`Settings` is what `create_app(settings)` and `gradwatch serve` use. Each field
is read from a `GRADWATCH_*` variable (`GRADWATCH_DB` for the database URL,
`GRADWATCH_TOKEN`, `GRADWATCH_READ_TOKEN`, `GRADWATCH_PORT`, ...) and can be
overridden by its `gradwatch serve` flag (`SERVE_FLAGS`); the CLI passes only
the flags given, so flag > variable > default. `ClientSettings` is the same
for the commands that talk to a server (`recommend`, `push`, `report`).
"""
from __future__ import annotations

from typing import Annotated

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

SETTINGS_ENV = "GRADWATCH_SERVER_SETTINGS"   # settings handed to worker processes, as JSON
DEFAULT_DB = "sqlite:///gradwatch.db"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_MAX_BODY = 32 * 1024 * 1024


class Settings(BaseSettings):
    """Everything the server needs. Empty tokens mean "not set"."""

    model_config = SettingsConfigDict(env_prefix="GRADWATCH_", frozen=True, extra="ignore",
                                      populate_by_name=True)

    db_url: str = Field(DEFAULT_DB, validation_alias=AliasChoices("GRADWATCH_DB"),
                        description="SQLAlchemy database URL (sqlite:///file.db or postgresql://...)")
    host: str = Field(DEFAULT_HOST, description="address to bind")
    port: int = Field(DEFAULT_PORT, ge=1, le=65535, description="port to listen on")
    token: str | None = Field(None, description="write token guarding ingest and deletes")
    read_token: str | None = Field(None, description="read token guarding reads and the dashboard")
    max_body: int = Field(DEFAULT_MAX_BODY, gt=0, description="largest accepted request body, in bytes")
    workers: int = Field(1, ge=1, description="worker processes, each its own socket on Linux (use with PostgreSQL)")
    cache_mb: float = Field(128, gt=0, description="megabytes of run columns each process keeps in memory "
                            "(the least recently read runs go first)")
    live_queue_bytes: int = Field(4 * 2**20, ge=1024, description="bytes of updates queued for one live-feed "
                                  "socket; a dashboard further behind gets a resync message instead")
    allow_origin: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="browser origin allowed to open the WebSockets besides the "
                                          "server's own (repeatable or comma list, e.g. https://gw.example.com)")
    allow_host: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Host name the server answers besides the loopback names "
                                          "(repeatable or comma list; '*' answers any)")
    alert_webhook: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="webhook URL for alerts (repeatable; env: comma list)")
    alert_clip_rate: float | None = Field(None, ge=0.0, lt=1.0,
                                          description="alert when more than this share of the last "
                                                      "--alert-window steps were clipped")
    alert_window: int = Field(100, ge=1, description="steps the sustained-clipping alert looks at")
    alert_min_interval: float = Field(300.0, ge=0.0, description="seconds between two alerts of one "
                                                                  "kind about one run")
    body_idle_timeout: float = Field(15.0, gt=0.0, description="seconds a request body may send nothing "
                                     "before it is answered 408 and its connection closed")
    body_deadline: float = Field(30.0, gt=0.0, description="seconds any body may take in all; a larger "
                                 "body gets size / 256 KiB/s if that is longer")
    ws_ping_interval: float = Field(20.0, gt=0.0, description="seconds between WebSocket pings (a client "
                                    "stalled mid-message cannot answer one)")
    ws_ping_timeout: float = Field(20.0, gt=0.0, description="seconds a WebSocket has to answer a ping "
                                   "before it is closed")
    max_connections: int = Field(1000, ge=1, description="open connections per server process; past it "
                                 "new requests get 503 (uvicorn's limit_concurrency)")

    @field_validator("token", "read_token")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("allow_origin", "allow_host", "alert_webhook", mode="before")
    @classmethod
    def _comma_list(cls, value) -> list[str]:
        """`a,b` (a variable) or ["a", "b,c"] (repeated flags): one flat list, blanks dropped."""
        items = [value] if isinstance(value, str) else list(value or ())
        return [part.strip() for item in items for part in str(item).split(",") if part.strip()]

    @classmethod
    def env_name(cls, field: str) -> str:
        return "GRADWATCH_DB" if field == "db_url" else "GRADWATCH_" + field.upper()

    def to_env(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_env(cls) -> "Settings":
        """In a worker process: the settings `gradwatch serve` packed; else GRADWATCH_* variables."""
        import os

        packed = os.environ.get(SETTINGS_ENV)
        return cls.model_validate_json(packed) if packed else cls()


# `gradwatch serve` flag of each Settings field.
SERVE_FLAGS = {"db_url": "--db", "host": "--host", "port": "--port", "token": "--token",
               "read_token": "--read-token", "max_body": "--max-body", "workers": "--workers",
               "cache_mb": "--cache-mb", "live_queue_bytes": "--live-queue-bytes", "allow_origin": "--allow-origin",
               "allow_host": "--allow-host", "alert_webhook": "--alert-webhook",
               "alert_clip_rate": "--alert-clip-rate", "alert_window": "--alert-window",
               "alert_min_interval": "--alert-min-interval", "body_idle_timeout": "--body-idle-timeout",
               "body_deadline": "--body-deadline", "ws_ping_interval": "--ws-ping-interval",
               "ws_ping_timeout": "--ws-ping-timeout", "max_connections": "--max-connections"}


class ClientSettings(BaseSettings):
    """Where the client commands find the server, and with which tokens."""

    model_config = SettingsConfigDict(env_prefix="GRADWATCH_", frozen=True, extra="ignore")

    url: str = Field(f"http://{DEFAULT_HOST}:{DEFAULT_PORT}", description="server address")
    token: str | None = Field(None, description="write token")
    read_token: str | None = Field(None, description="read token")
