"""gradwatch.dashboard: the static web page the server serves at `/`."""
from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent
