"""Server settings: one object, built from `gradwatch serve` flags or the environment."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass

DEFAULT_DB = "sqlite:///gradwatch.db"
DEFAULT_MAX_BODY = 32 * 1024 * 1024
SETTINGS_ENV = "GRADWATCH_SERVER_SETTINGS"


@dataclass(frozen=True)
class Settings:
    """Everything `create_app` needs. Empty tokens mean "not set"."""

    db_url: str = DEFAULT_DB
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    read_token: str | None = None
    max_body: int = DEFAULT_MAX_BODY
    workers: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "token", self.token or None)
        object.__setattr__(self, "read_token", self.read_token or None)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Settings":
        return cls(db_url=args.db, host=args.host, port=args.port, token=args.token,
                   read_token=args.read_token, max_body=args.max_body,
                   workers=getattr(args, "workers", 1) or 1)

    @classmethod
    def from_env(cls) -> "Settings":
        """Settings handed to uvicorn worker processes (see `serve.py`), else GRADWATCH_* vars."""
        packed = os.environ.get(SETTINGS_ENV)
        if packed:
            return cls(**json.loads(packed))
        return cls(db_url=os.environ.get("GRADWATCH_DB", DEFAULT_DB),
                   token=os.environ.get("GRADWATCH_TOKEN"),
                   read_token=os.environ.get("GRADWATCH_READ_TOKEN"))

    def to_env(self) -> str:
        return json.dumps(asdict(self))
