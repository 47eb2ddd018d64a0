"""docker-compose.yml and Dockerfile agree with the CLI.

There is no Docker engine on the CI machine, so these files are checked by
reading them: every `gradwatch` command they run must parse with the real
argument parser, ports must match, the database must live on a named volume,
and the health checks must hit `/healthz`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from gradwatch.server.commands.cli import DEFAULT_PORT, build_parser

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            rows.append((keyword.upper(), rest.strip()))
    return rows


def _substitute_env(argv: list[str]) -> list[str]:
    """Replace compose's ${VAR:-default} with its default, as compose would with VAR unset."""
    return [re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", arg) for arg in argv]


def _parse_serve(argv: list[str]):
    assert argv[:2] == ["gradwatch", "serve"], argv
    return build_parser().parse_args(argv[1:])


def test_dockerfile_cmd_is_a_valid_serve_command_on_the_exposed_port():
    rows = _dockerfile_instructions()
    keywords = [keyword for keyword, _ in rows]
    assert keywords[0] == "FROM"
    cmd = json.loads(dict(rows)["CMD"])
    args = _parse_serve(cmd)
    assert args.host == "0.0.0.0"
    exposed = [int(rest) for keyword, rest in rows if keyword == "EXPOSE"]
    assert exposed == [args.port] == [DEFAULT_PORT]
    # Installs the project itself (with the PostgreSQL driver), copying every package folder.
    runs = " ".join(rest for keyword, rest in rows if keyword == "RUN")
    assert "pip install '.[postgres]'" in runs
    copied = " ".join(rest for keyword, rest in rows if keyword == "COPY")
    for folder in ("clip", "agent", "server", "dashboard", "pyproject.toml"):
        assert folder in copied
    health = dict(rows)["HEALTHCHECK"]
    assert f"127.0.0.1:{args.port}/healthz" in health


def test_compose_services_run_valid_serve_commands():
    compose = _compose()
    servers = {name: svc for name, svc in compose["services"].items() if "build" in svc}
    assert set(servers) == {"gradwatch", "gradwatch-pg"}
    for name, service in servers.items():
        args = _parse_serve(_substitute_env(service["command"]))
        assert args.host == "0.0.0.0", name
        host_port, container_port = service["ports"][0].rsplit(":", 2)[-2:]
        assert int(container_port) == args.port == DEFAULT_PORT, name
        # The write token comes from the environment, never from the file.
        assert "GRADWATCH_TOKEN" in service["environment"], name
        assert service["environment"]["GRADWATCH_TOKEN"].startswith("${GRADWATCH_TOKEN"), name
        test = " ".join(service["healthcheck"]["test"])
        assert f"127.0.0.1:{args.port}/healthz" in test, name


def test_compose_sqlite_database_is_on_a_named_volume():
    compose = _compose()
    service = compose["services"]["gradwatch"]
    args = _parse_serve(_substitute_env(service["command"]))
    assert args.db.startswith("sqlite:////data/")
    volume, mount = service["volumes"][0].split(":")
    assert mount == "/data" and volume in compose["volumes"]


def test_compose_postgres_profile_points_the_server_at_the_postgres_service():
    compose = _compose()
    postgres = compose["services"]["postgres"]
    server = compose["services"]["gradwatch-pg"]
    assert postgres["profiles"] == server["profiles"] == ["postgres"]
    args = _parse_serve(_substitute_env(server["command"]))
    assert args.db.startswith("postgresql+psycopg://gradwatch:")
    assert "@postgres:5432/gradwatch" in args.db
    assert postgres["environment"]["POSTGRES_DB"] == "gradwatch"
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert args.workers >= 2
    # The two servers do not fight over one host port.
    host_ports = {svc["ports"][0].rsplit(":", 1)[0] for svc in (server, compose["services"]["gradwatch"])}
    assert len(host_ports) == 2
