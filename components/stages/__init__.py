"""The loop's stages, one module each, each a `run(ctx)` over one run folder: ingest, validate,
labels, train, evaluate, register (with the compression stage), gate, promote."""
