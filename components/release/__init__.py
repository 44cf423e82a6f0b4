"""The release layer: the MLflow registry adapter (the only mlflow import), the pure gate and
promotion rules, and the retrain-trigger decision."""
