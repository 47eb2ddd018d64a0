"""gradwatch.dashboard: the static web page the server serves at `/`."""
from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent

PLOTLY_CARTESIAN = STATIC_DIR / "plotly-cartesian.min.js"  # npm plotly.js-cartesian-dist-min, see plotly-cartesian.json


def plotly_bundle_path() -> Path | None:
    """The plotly.js the page and the report use: the shipped cartesian bundle (1.5 MB,
    scatter/bar/histogram/heatmap), else the `plotly` package's full bundle, else None."""
    if PLOTLY_CARTESIAN.is_file():
        return PLOTLY_CARTESIAN
    import importlib.util

    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        return None
    full = Path(list(spec.submodule_search_locations)[0]) / "package_data" / "plotly.min.js"
    return full if full.is_file() else None
