"""The naive baseline of benchmarks/serve.py: the same champion model and catalogue embeddings
behind a plain FastAPI /search served by uvicorn (one worker), with none of the service's
machinery: one request → one model call (no batching), no cache, exact numpy search over every
catalogue embedding.

    VITRINE_HOME=.vitrine python benchmarks/naive_server.py --port 3100
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import torch
import uvicorn
from fastapi import FastAPI, File, Form, UploadFile
from PIL import Image

from components.config import configure_environment, load_params, state_paths
from components.model.transforms import model_input, to_tensor
from components.release.registry import open_registry


def build_app() -> FastAPI:
    paths = state_paths()
    configure_environment(paths)
    params = load_params()
    registry = open_registry(paths, params)
    version = registry.alias_version("champion")
    model = registry.load_model(version).eval()
    with tempfile.TemporaryDirectory() as tmp:
        index_dir = registry.download_artifacts(version, "index", Path(tmp))
        embeddings = np.load(index_dir / "embeddings.npy")
        products = pd.read_parquet(index_dir / "products.parquet")
    ids, cats = products["product_id"].to_numpy(), products["category"].to_numpy()
    app = FastAPI()

    @app.post("/search")
    def search(image: Annotated[UploadFile, File()], k: Annotated[int, Form()] = 10) -> dict:
        pixels = model_input(Image.open(io.BytesIO(image.file.read())), model)
        with torch.inference_mode():
            _, emb = model(to_tensor(pixels[None].copy()))
        scores = embeddings @ emb[0].numpy()
        top = np.argsort(-scores)[:k]
        return {
            "model_version": version,
            "results": [
                {"product_id": ids[i], "score": float(scores[i]), "category": cats[i]} for i in top
            ],
        }

    @app.get("/readyz")
    def ready() -> dict:
        return {"ready": True, "model_version": version}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3100)
    args = parser.parse_args()
    uvicorn.run(build_app(), host=args.host, port=args.port, log_level="warning", workers=1)


if __name__ == "__main__":
    main()
