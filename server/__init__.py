"""gradwatch.server: storage, ingest, REST API and live feed for gradient norms."""
