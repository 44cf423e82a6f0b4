"""Serving helpers with no BentoML import: upload decoding, the micro-batcher and thread pins,
the JSONL request and A/B logs, the Prometheus metrics, and A/B routing and verdicts."""
