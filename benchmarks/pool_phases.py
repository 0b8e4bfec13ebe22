"""Two timed phases over a pool of processes, the way `image_pipeline.py` measures both tools: tokenise the rows in
chunks, then collate the encoded rows in batches, each phase after a warm-up call per process (imports, loading the
tokenizer or processor). It imports nothing of rayft, so LLaMA-Factory's side runs it in its own environment."""

import time


def timed_phases(pool, processes: int, rows: list, chunk: int, batch: int, tokenise, collate):
    """(encoded rows, collate's results, seconds tokenising, seconds collating)."""
    chunks = [rows[i:i + chunk] for i in range(0, len(rows), chunk)]
    pool.map(tokenise, chunks[:processes])
    start = time.perf_counter()
    encoded = [row for part in pool.map(tokenise, chunks) for row in part]
    tokenised = time.perf_counter() - start
    batches = [encoded[i:i + batch] for i in range(0, len(encoded), batch)]
    pool.map(collate, batches[:processes])
    start = time.perf_counter()
    collated = pool.map(collate, batches)
    return encoded, collated, tokenised, time.perf_counter() - start
