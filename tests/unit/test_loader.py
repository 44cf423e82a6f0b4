"""The service's bundle loader against a real MLflow sqlite store: which index revision and
text space a version is served with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bentos import loader as loader_module
from bentos.http import ApiError
from bentos.loader import ModelLoader
from components.config import state_paths
from components.release.registry import Registry
from components.retrieval.text import TEXT_DIM, TextProjection


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> tuple[Registry, Path]:
    """Version 1: a linear model with an index of 50 products and a text projection."""
    home = tmp_path_factory.mktemp("loader")
    registry = Registry(
        f"sqlite:///{home / 'mlflow.db'}", home / "artifacts", "m", home / "audit.jsonl"
    )
    index = home / "index"
    index.mkdir()
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((50, 8)).astype(np.float32)
    np.save(index / "embeddings.npy", emb / np.linalg.norm(emb, axis=1, keepdims=True))
    products = pd.DataFrame(
        {"product_id": [f"p{i}" for i in range(50)], "category": "Bag", "title": "", "path": ""}
    )
    products.to_parquet(index / "products.parquet", index=False)
    weight = rng.standard_normal((8, TEXT_DIM)).astype(np.float32)
    TextProjection(weight, np.zeros(TEXT_DIM, np.float32)).save(index / "text_projection.npz")
    with registry.start_run("train"):
        registry.log_and_register_model(
            torch.nn.Linear(4, 2), np.zeros((1, 4), np.float32), {"index": index}, {}
        )
    return registry, home


def test_a_text_space_above_the_memory_limit_is_not_built_and_says_why(registered, monkeypatch):
    registry, home = registered
    loader = ModelLoader(state_paths(home / "state"), None, None, "fp32", "off")
    revision = registry.index_revision("1")
    index, text, note = loader.load_index(registry, "1", revision)
    assert len(index) == 50 and text.shape == (50, TEXT_DIM) and note is None

    monkeypatch.setattr(loader_module, "TEXT_SPACE_MAX_BYTES", 50 * TEXT_DIM * 4 - 1)
    index, text, note = loader.load_index(registry, "1", revision)
    assert len(index) == 50 and text is None  # image search still served
    assert "serves no text search: its 50 products" in note
    bundle = loader_module.Bundle("1", None, index, "now", 0.0, text, text_note=note)
    with pytest.raises(ApiError) as refused:
        bundle.text_space()
    assert refused.value.status == 409 and note in refused.value.message
