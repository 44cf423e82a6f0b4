"""The data layer: the catalogue (manifest schema, ingest), validation (Great Expectations +
quarantine), label cleaning (cleanlab), DVC versioning and the catalogue's sources."""
