"""Benchmark the catalogue index (HNSW or IVF, as the service loads it) against exact FAISS search.

Data: --n synthetic L2-normalised vectors of --dim (the model's embedding size, 128) drawn from a
Gaussian mixture of --clusters clusters, each spread along its own random --local-rank-dimensional
subspace plus small isotropic noise (low intrinsic dimension, like real embeddings; uniform
high-dimensional noise would have no neighbourhood structure), generated in seeded shards so ten
million of them never sit in memory at once. --queries held-out queries come from the same
mixture. Ground truth: IndexFlatIP over each shard, merged.

The index side is the service's own path: the shards are written as an index artifact folder
(embeddings.npy + products.parquet, what the evaluate stage registers) and a fresh process
runs CatalogueIndex.load on it (--kind auto: exact up to 100,000 products, HNSW up to 2M, IVF
above; or forced), then sweeps the search width (efSearch for HNSW, nprobe for IVF). That
process's resident memory is the index's footprint (plus Python, numpy, faiss and pyarrow).

Headline: the smallest width reaching --target-recall (default: 0.95 for IVF, 0.98 for HNSW);
qps = single-threaded loop of one query at a time (how the service calls it), speedup = that /
exact's single-threaded loop over all shards. Batched figures (all queries in one call, all
cores) beside it; filtered recall@10 = the same queries with a category filter (a tenth of the
catalogue), against the exact filtered top 10.

    python benchmarks/index.py --n 1000000 --json bench-index-1m.json
    python benchmarks/index.py --n 1000000 --kind ivf --json bench-index-1m-ivf.json
    python benchmarks/index.py --n 10000000 --json bench-index-10m.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from components.retrieval.index import CatalogueIndex
from components.serving.runtime import settle_heap

CATEGORIES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]
CATEGORIES += ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILTER = "Bag"
SHARD = 500_000
GOALS = {"ivf": (0.95, 50.0, 4.0), "hnsw": (0.98, 10.0, None), "exact": (1.0, 0.0, None)}


class Mixture:
    """The structured Gaussian mixture, row block by row block (each block seeded on its own)."""

    def __init__(self, args: argparse.Namespace):
        rng = np.random.default_rng(args.seed)
        self.args = args
        self.centers = rng.standard_normal((args.clusters, args.dim)).astype(np.float32)
        self.centers /= np.linalg.norm(self.centers, axis=1, keepdims=True)
        shape = (args.clusters, args.dim, args.local_rank)
        self.bases = rng.standard_normal(shape).astype(np.float32)
        self.bases /= np.linalg.norm(self.bases, axis=1, keepdims=True)

    def block(self, count: int, seed: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, cluster of each) for one block."""
        args, rng = self.args, np.random.default_rng([self.args.seed, *seed])
        labels = rng.integers(0, args.clusters, count)
        x = np.empty((count, args.dim), dtype=np.float32)
        for c in range(args.clusters):
            idx = np.flatnonzero(labels == c)
            z = rng.standard_normal((len(idx), args.local_rank)).astype(np.float32)
            x[idx] = self.centers[c] + (z * args.spread) @ self.bases[c].T
        x += rng.standard_normal(x.shape, dtype=np.float32) * args.noise
        faiss.normalize_L2(x)
        return x, labels


def merge_top(scores, ids, new_scores, new_ids, k):
    """Keep the best k of two (queries × k) top lists."""
    s, i = np.hstack([scores, new_scores]), np.hstack([ids, new_ids])
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


def one_at_a_time(search_one, queries: np.ndarray) -> tuple[float, list]:
    """Seconds of one-at-a-time calls on a single thread, and their results."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        start = time.perf_counter()
        out = [search_one(q) for q in queries]
        return time.perf_counter() - start, out
    finally:
        faiss.omp_set_num_threads(threads)


def write_artifact(args: argparse.Namespace, folder: Path, k: int) -> dict:
    """The index artifact folder of --n products, plus the exact answers and exact's speed."""
    mix = Mixture(args)
    queries, _ = mix.block(args.queries, (1, 0))
    n_filtered = min(args.queries, 200)
    truth = (np.full((args.queries, k), -np.inf, np.float32), np.full((args.queries, k), -1))
    ftruth = (np.full((n_filtered, k), -np.inf, np.float32), np.full((n_filtered, k), -1))
    loop_s = batch_s = 0.0
    emb = np.lib.format.open_memmap(folder / "embeddings.npy", "w+", np.float32, (args.n, args.dim))
    schema = pa.schema([("product_id", pa.string()), ("category", pa.string())])
    with pq.ParquetWriter(folder / "products.parquet", schema) as writer:
        for start in range(0, args.n, SHARD):
            count = min(SHARD, args.n - start)
            x, labels = mix.block(count, (2, start))
            emb[start : start + count] = x
            category = np.array(CATEGORIES, dtype=object)[labels % len(CATEGORIES)]
            ids = [f"p{i}" for i in range(start, start + count)]
            writer.write_table(pa.table({"product_id": ids, "category": category}, schema))
            exact = faiss.IndexFlatIP(args.dim)
            exact.add(x)
            t0 = time.perf_counter()
            s, i = exact.search(queries, k)
            batch_s += time.perf_counter() - t0
            truth = merge_top(*truth, s, np.where(i >= 0, i + start, -1), k)
            seconds, _ = one_at_a_time(
                lambda q, e=exact: e.search(q[None], k), queries[: args.exact_loop_queries]
            )
            loop_s += seconds
            is_filtered = np.flatnonzero(category == FILTER)
            sub = faiss.IndexFlatIP(args.dim)
            sub.add(x[is_filtered])
            s, i = sub.search(queries[:n_filtered], k)
            rows = np.where(i >= 0, is_filtered[np.maximum(i, 0)] + start, -1)
            ftruth = merge_top(*ftruth, s, rows, k)
            print(f"  shard {start // SHARD + 1}/{-(-args.n // SHARD)} written", flush=True)
    emb.flush()
    del emb
    np.save(folder / "queries.npy", queries)
    np.save(folder / "truth.npy", truth[1])
    np.save(folder / "filtered_truth.npy", ftruth[1])
    return {
        "exact_qps": args.exact_loop_queries / loop_s,
        "exact_batch_qps": args.queries / batch_s,
    }


def recall_at(hits: list[list[str]], truth: np.ndarray, k: int) -> float:
    found = [
        len({int(p[1:]) for p in row[:k]} & set(t[:k].tolist()))
        for row, t in zip(hits, truth, strict=True)
    ]
    return float(np.mean(found) / k)


def memory_gb() -> tuple[float, float]:
    """(resident, peak resident) GB of this process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return tuple(int(fields[f].split()[0]) / 2**20 for f in ("VmRSS", "VmHWM"))


def serve_and_measure(folder: str, kind: str, codes: str, widths: list[int], k: int) -> dict:
    """In a fresh process: load the index as the service does, sweep the search width."""
    folder = Path(folder)
    forced = {"exact": {}, "hnsw": {"exact_max": 0}, "ivf": {"exact_max": 0, "ivf_min": 0}}
    t0 = time.perf_counter()
    index = CatalogueIndex.load(folder, codes=codes, **forced.get(kind, {}))
    build_s = time.perf_counter() - t0
    settle_heap()  # what the service does after each load (gc freeze, malloc_trim)
    rss_loaded, _ = memory_gb()
    queries = np.load(folder / "queries.npy")
    truth, ftruth = np.load(folder / "truth.npy"), np.load(folder / "filtered_truth.npy")
    sweep = []
    for width in widths:
        if index.kind == "ivf":
            index.nprobe = width
        else:
            index.ef_search = width
        seconds, hits = one_at_a_time(lambda q: index.search(q, k), queries)
        t0 = time.perf_counter()
        batch = index.search_batch(queries, k)
        batch_s = time.perf_counter() - t0
        seconds_filtered, filtered = one_at_a_time(
            lambda q: index.search(q, k, category=FILTER), queries[: len(ftruth)]
        )
        sweep.append(
            {
                "width": width,
                "recall_at_10": recall_at([[h.product_id for h in r] for r in hits], truth, k),
                "batch_recall_at_10": recall_at(
                    [[h.product_id for h in r] for r in batch], truth, k
                ),
                "filtered_recall_at_10": recall_at(
                    [[h.product_id for h in r] for r in filtered], ftruth, k
                ),
                "filtered_all_k": all(len(r) == k for r in filtered),
                "filtered_qps": len(ftruth) / seconds_filtered,
                "qps": len(queries) / seconds,
                "batch_qps": len(queries) / batch_s,
            }
        )
    rss, peak = memory_gb()
    return {
        "kind": index.kind,
        "build_s": build_s,
        "settings": vars(index.settings),
        "rss_gb": rss,
        "rss_loaded_gb": rss_loaded,
        "peak_rss_gb": peak,
        "sweep": sweep,
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
    p.add_argument("--kind", choices=["auto", "exact", "hnsw", "ivf"], default="auto")
    p.add_argument("--widths", default=None, help="efSearch / nprobe sweep, comma-separated")
    p.add_argument("--codes", default="SQ8", help="IVF codes (a faiss factory suffix: PQ32, …)")
    p.add_argument("--target-recall", type=float, default=None)
    p.add_argument("--exact-loop-queries", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="where the artifact is written")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args()


def main() -> None:
    args, k = parse_args(), 10
    print(
        f"data: {args.n:,} x {args.dim} Gaussian mixture ({args.clusters} clusters, local rank "
        f"{args.local_rank}, spread {args.spread}, noise {args.noise}), L2-normalised; "
        f"{args.queries} held-out queries; faiss {faiss.__version__}, "
        f"{faiss.omp_get_max_threads()} threads"
    )
    with tempfile.TemporaryDirectory(prefix="vitrine-index-bench-", dir=args.workdir) as tmp:
        t0 = time.perf_counter()
        exact = write_artifact(args, Path(tmp), k)
        print(
            f"artifact written and exact answers computed in {time.perf_counter() - t0:.0f} s; "
            f"exact IndexFlatIP: {exact['exact_qps']:.2f} q/s single-thread loop "
            f"({args.exact_loop_queries} queries over every shard), "
            f"{exact['exact_batch_qps']:.1f} q/s batched"
        )
        kind = args.kind
        if kind == "auto":
            kind = "exact" if args.n <= 100_000 else "hnsw" if args.n < 2_000_000 else "ivf"
        default_widths = "8,16,32,64,128" if kind == "ivf" else "32,64,128,256"
        widths = [int(v) for v in (args.widths or default_widths).split(",")]
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            served = pool.submit(serve_and_measure, tmp, args.kind, args.codes, widths, k).result()
    target, min_speedup, max_rss = GOALS[served["kind"]]
    target = args.target_recall or target
    print(
        f"{served['kind']} index loaded (built) by CatalogueIndex.load in {served['build_s']:.0f} s;"
        f" {served['settings']}; resident {served['rss_gb']:.2f} GB (peak {served['peak_rss_gb']:.2f})"
    )
    for row in served["sweep"]:
        print(
            f"  width={row['width']:4d}: recall@10 {row['recall_at_10']:.4f}  loop "
            f"{row['qps']:8.1f} q/s ({row['qps'] / exact['exact_qps']:7.1f}x exact)  batched "
            f"{row['batch_qps']:8.1f} q/s ({row['batch_qps'] / exact['exact_batch_qps']:6.1f}x)  "
            f"filtered recall@10 {row['filtered_recall_at_10']:.4f} at {row['filtered_qps']:.0f} q/s"
            f"{'' if row['filtered_all_k'] else ' (SHORT)'}"
        )
    ok = [r for r in served["sweep"] if r["recall_at_10"] >= target]
    best = ok[0] if ok else max(served["sweep"], key=lambda r: r["recall_at_10"])
    speedup = best["qps"] / exact["exact_qps"]
    settings = served["settings"]
    hnsw = served["kind"] == "hnsw"
    met = bool(ok) and speedup >= min_speedup and best["filtered_all_k"]
    met = met and (max_rss is None or served["rss_gb"] <= max_rss)
    result = {
        "n": args.n,
        "dim": args.dim,
        "kind": served["kind"],
        "recall_at_10": best["recall_at_10"],
        "filtered_recall_at_10": best["filtered_recall_at_10"],
        "filtered_qps": best["filtered_qps"],
        "qps": best["qps"],
        "exact_qps": exact["exact_qps"],
        "speedup": speedup,
        "build_s": served["build_s"],
        "rss_gb": served["rss_gb"],
        "peak_rss_gb": served["peak_rss_gb"],
        "ef_search": best["width"] if hnsw else None,
        "hnsw_m": settings["hnsw_m"] if hnsw else None,
        "ef_construction": settings["ef_construction"] if hnsw else None,
        "nprobe": best["width"] if served["kind"] == "ivf" else None,
        "nlist": settings["nlist"] if served["kind"] == "ivf" else None,
        "codes": settings["codes"] if served["kind"] == "ivf" else None,
        "batch_qps": best["batch_qps"],
        "exact_batch_qps": exact["exact_batch_qps"],
        "batch_speedup": best["batch_qps"] / exact["exact_batch_qps"],
        "headline": "single-threaded loop of one query at a time",
        "data": f"gaussian mixture: {args.clusters} clusters, local rank {args.local_rank}",
        "goal": {"recall_at_10": target, "speedup": min_speedup, "rss_gb": max_rss},
        "target_met": met,
        "sweep": served["sweep"],
    }
    print(
        f"HEADLINE ({served['kind']}, width {best['width']}, single-thread loop): recall@10 "
        f"{result['recall_at_10']:.4f}, {result['qps']:.0f} q/s vs exact "
        f"{result['exact_qps']:.2f} q/s = {speedup:.1f}x; batched {result['batch_speedup']:.1f}x; "
        f"resident {result['rss_gb']:.2f} GB; build {result['build_s']:.0f} s; goal recall>="
        f"{target} at >={min_speedup:g}x{f' in <={max_rss:g} GB' if max_rss else ''}: "
        f"{'MET' if met else 'NOT MET'}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
