"""gradwatch.server: the server side, in rooms (docs/architecture.md).

- `wire/`: what arrives, decoded and validated (JSON and msgpack, one schema), and the JSON
  shapes the API answers with (`wire.responses`);
- `app/`: the HTTP app (`create_app`, routes, the edge, the live feed, settings);
- `analysis/`: statistics, spike rules, the recommendation, derived events, tensor groups;
- `storage/`: the column registry and tables, migrations, ingest, reads, the run cache, and the
  chunk layout (`storage/chunks/`);
- `alerts/`: webhooks on spikes, non-finite steps, level shifts, sustained clipping;
- `commands/`: the `gradwatch` command line (serve, workers, demo, report, recommend, client).

Imports go one way: commands -> app -> analysis -> storage (the wire beside them).
"""
