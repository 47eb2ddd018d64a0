"""The API as `APIRouter` modules; `create_app` includes `ROUTERS` in this order.

- `ingest`: POST /api/runs/{run}/steps, WS /ws/ingest
- `runs`: GET /api/runs, DELETE /api/runs/{run}, series, events, tensors, export.csv
- `statistics`: stats, recommendation, whatif, histogram
- `live`: WS /ws/live/{run}
- `static`: /, /static/{name}, /healthz
- `deps`: the typed dependencies (store, settings, hub, auth) every route takes
"""
from gradwatch.server.app.routes import ingest, live, runs, static, statistics

ROUTERS = (static.router, ingest.router, live.router, runs.router, statistics.router)
