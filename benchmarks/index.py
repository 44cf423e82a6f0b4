"""Benchmark the catalogue index: HNSW (through CatalogueIndex) against exact FAISS search.

Data: --n synthetic L2-normalised vectors of --dim (the model's embedding size, 128) drawn from a
Gaussian mixture of --clusters clusters, each spread along its own random --local-rank-dimensional
subspace plus small isotropic noise (low intrinsic dimension, like real embeddings; uniform
high-dimensional noise would have no neighbourhood structure). --queries held-out queries come from
the same mixture. Ground truth: IndexFlatIP. The HNSW side is CatalogueIndex.build(...,
exact_max < n), the code path the service uses, swept over --ef-search values (one build).

Headline: the smallest efSearch reaching --target-recall; qps = single-threaded loop of one query
at a time (how the service calls it), speedup = that / exact's single-threaded loop. Batched
figures (all queries in one call, all cores) are printed beside it.

    python benchmarks/index.py --n 1000000 --json bench-index.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from components.retrieval.index import CatalogueIndex

CATEGORIES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]
CATEGORIES += ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def make_mixture(args: argparse.Namespace, rng: np.random.Generator):
    """(base, queries, base_cluster) from one structured Gaussian mixture, L2-normalised."""
    centers = rng.standard_normal((args.clusters, args.dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    bases = rng.standard_normal((args.clusters, args.dim, args.local_rank)).astype(np.float32)
    bases /= np.linalg.norm(bases, axis=1, keepdims=True)
    total = args.n + args.queries
    labels = rng.integers(0, args.clusters, total)
    x = np.empty((total, args.dim), dtype=np.float32)
    for c in range(args.clusters):
        idx = np.flatnonzero(labels == c)
        z = rng.standard_normal((len(idx), args.local_rank)).astype(np.float32) * args.spread
        x[idx] = centers[c] + z @ bases[c].T
    x += rng.standard_normal(x.shape, dtype=np.float32) * args.noise
    faiss.normalize_L2(x)
    return x[: args.n], x[args.n :], labels[: args.n]


def time_loop(search_one, queries: np.ndarray) -> tuple[float, list]:
    """Queries/s of one-at-a-time calls on a single thread, and their results."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        start = time.perf_counter()
        out = [search_one(q) for q in queries]
        return len(queries) / (time.perf_counter() - start), out
    finally:
        faiss.omp_set_num_threads(threads)


def recall_at(hits: list[list[str]], truth: np.ndarray, k: int) -> float:
    found = [
        len({int(p[1:]) for p in row[:k]} & set(t[:k].tolist()))
        for row, t in zip(hits, truth, strict=True)
    ]
    return float(np.mean(found) / k)


def measure_exact(base: np.ndarray, queries: np.ndarray, k: int, loop_queries: int) -> dict:
    exact = faiss.IndexFlatIP(base.shape[1])
    exact.add(base)
    start = time.perf_counter()
    _, truth = exact.search(queries, k)
    batch_qps = len(queries) / (time.perf_counter() - start)
    loop_qps, _ = time_loop(lambda q: exact.search(q[None], k), queries[:loop_queries])
    return {"truth": truth, "exact_qps": loop_qps, "exact_batch_qps": batch_qps}


def measure_hnsw(index: CatalogueIndex, queries: np.ndarray, truth: np.ndarray, k: int, ef: int):
    index.ef_search = ef
    loop_qps, hits = time_loop(lambda q: index.search(q, k), queries)
    start = time.perf_counter()
    batch = index.search_batch(queries, k)
    batch_qps = len(queries) / (time.perf_counter() - start)
    ids = [[h.product_id for h in row] for row in hits]
    batch_ids = [[h.product_id for h in row] for row in batch]
    return {
        "ef_search": ef,
        "recall_at_10": recall_at(ids, truth, k),
        "batch_recall_at_10": recall_at(batch_ids, truth, k),
        "qps": loop_qps,
        "batch_qps": batch_qps,
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--clusters", type=int, default=300)
    p.add_argument("--local-rank", type=int, default=16)
    p.add_argument("--spread", type=float, default=0.15, help="per-axis std inside a cluster")
    p.add_argument("--noise", type=float, default=0.02, help="isotropic per-dimension noise std")
    p.add_argument("--m", type=int, default=32, help="HNSW M")
    p.add_argument("--ef-construction", type=int, default=80)
    p.add_argument("--ef-search", default="32,64,128,256", help="comma-separated sweep")
    p.add_argument("--target-recall", type=float, default=0.98)
    p.add_argument("--exact-loop-queries", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args()


def main() -> None:
    args, k = parse_args(), 10
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    base, queries, labels = make_mixture(args, rng)
    print(
        f"data: {args.n:,} x {args.dim} Gaussian mixture ({args.clusters} clusters, local rank "
        f"{args.local_rank}, spread {args.spread}, noise {args.noise}), L2-normalised; "
        f"{args.queries} held-out queries; generated in {time.perf_counter() - t0:.1f} s; "
        f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads"
    )
    exact = measure_exact(base, queries, k, args.exact_loop_queries)
    print(
        f"exact IndexFlatIP: {exact['exact_qps']:.1f} q/s single-thread loop "
        f"({args.exact_loop_queries} queries), {exact['exact_batch_qps']:.1f} q/s batched"
    )
    products = pd.DataFrame(
        {
            "product_id": [f"p{i}" for i in range(args.n)],
            "category": np.array(CATEGORIES, dtype=object)[labels % len(CATEGORIES)],
        }
    )
    t0 = time.perf_counter()
    index = CatalogueIndex.build(
        base, products, exact_max=args.n - 1, hnsw_m=args.m, ef_construction=args.ef_construction
    )
    build_s = time.perf_counter() - t0
    print(
        f"HNSW build (CatalogueIndex.build, kind={index.kind}, M={args.m}, "
        f"efConstruction={args.ef_construction}): {build_s:.1f} s"
    )
    sweep = []
    for ef in [int(v) for v in args.ef_search.split(",")]:
        row = measure_hnsw(index, queries, exact["truth"], k, ef)
        sweep.append(row)
        print(
            f"  efSearch={ef:4d}: recall@10 {row['recall_at_10']:.4f}  loop {row['qps']:8.1f} q/s "
            f"({row['qps'] / exact['exact_qps']:6.1f}x exact)  batched {row['batch_qps']:8.1f} q/s "
            f"({row['batch_qps'] / exact['exact_batch_qps']:6.1f}x exact batched)"
        )
    ok = [r for r in sweep if r["recall_at_10"] >= args.target_recall]
    best = ok[0] if ok else max(sweep, key=lambda r: r["recall_at_10"])
    result = {
        "n": args.n,
        "dim": args.dim,
        "recall_at_10": best["recall_at_10"],
        "qps": best["qps"],
        "exact_qps": exact["exact_qps"],
        "speedup": best["qps"] / exact["exact_qps"],
        "build_s": build_s,
        "ef_search": best["ef_search"],
        "hnsw_m": args.m,
        "ef_construction": args.ef_construction,
        "batch_qps": best["batch_qps"],
        "exact_batch_qps": exact["exact_batch_qps"],
        "batch_speedup": best["batch_qps"] / exact["exact_batch_qps"],
        "headline": "single-threaded loop of one query at a time",
        "data": f"gaussian mixture: {args.clusters} clusters, local rank {args.local_rank}",
        "target_met": bool(ok) and best["qps"] >= 10 * exact["exact_qps"],
        "sweep": sweep,
    }
    print(
        f"HEADLINE (efSearch={best['ef_search']}, single-thread loop): recall@10 "
        f"{result['recall_at_10']:.4f}, {result['qps']:.0f} q/s vs exact {result['exact_qps']:.1f} "
        f"q/s = {result['speedup']:.1f}x; batched {result['batch_speedup']:.1f}x; build "
        f"{build_s:.0f} s; goal recall>=0.98 at >=10x: {'MET' if result['target_met'] else 'NOT MET'}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
