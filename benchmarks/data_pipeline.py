"""Data pipeline: rows and tokens per second of rayft's Ray Data tokenisation against a single-process
Hugging Face `datasets.map` with the same encoding function on the same examples.

    .venv/bin/python benchmarks/data_pipeline.py [--copies 20 --batch-size 256]

The examples are `alpaca_en_demo` (rayft's `demo_sft` when ../shared is absent) repeated `--copies` times.
Ray starts before the clock does (a cluster is up when a run tokenises); both sides end with every row
tokenised and held (Ray Data materialised in the object store, `datasets` in its Arrow table).
"""

import argparse
import tempfile
import time

from common import ROOT, TINY, table, write

SHARED = ROOT.parent / "shared" / "data" / "llamafactory"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--cutoff-len", type=int, default=512)
    args = parser.parse_args()

    import datasets
    import ray

    from rayft.data.examples import Rows
    from rayft.data.pipeline import EncodingSettings, encode_batch, load_examples, token_stats, tokenize
    from rayft.data.tokenizer import TokenizerSpec

    shared = (SHARED / "dataset_info.json").is_file()
    name, folder = ("alpaca_en_demo", SHARED) if shared else ("demo_sft", ROOT / "data" / "demo")
    examples = load_examples(name, str(folder), None) * args.copies
    print(f"{len(examples)} examples ({name} x {args.copies}), batches of {args.batch_size}, cutoff_len "
          f"{args.cutoff_len}")
    encode = dict(tokenizer_spec=TokenizerSpec(str(TINY)), settings=EncodingSettings("qwen", args.cutoff_len))
    rows = []

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        table_ds = datasets.Dataset.from_list(examples)
        mapped = table_ds.map(lambda batch: {k: list(v) for k, v in encode_batch(batch, **encode).items()},
                              batched=True, batch_size=args.batch_size, remove_columns=table_ds.column_names,
                              cache_file_name=f"{cache}/mapped.arrow")
        seconds = time.perf_counter() - start
        tokens = sum(mapped["num_tokens"])
    rows.append({"pipeline": "datasets.map, 1 process", "seconds": round(seconds, 2),
                 "rows/s": round(len(examples) / seconds, 1), "tokens/s": round(tokens / seconds, 1)})

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        from rayft.orchestrator.launch import configure_ray_data

        configure_ray_data()
        start = time.perf_counter()
        dataset = tokenize(Rows.of(examples), TokenizerSpec(str(TINY)),
                           EncodingSettings(template="qwen", cutoff_len=args.cutoff_len),
                           encode_batch, args.batch_size)
        seconds = time.perf_counter() - start
        stats = token_stats(dataset)
    finally:
        ray.shutdown()
    assert stats["tokens"] == tokens, (stats["tokens"], tokens)  # the same work on both sides
    rows.append({"pipeline": f"rayft Ray Data, {int(2)} CPUs", "seconds": round(seconds, 2),
                 "rows/s": round(len(examples) / seconds, 1), "tokens/s": round(tokens / seconds, 1)})
    rows[1]["vs datasets.map"] = round(rows[0]["seconds"] / rows[1]["seconds"], 3)
    print()
    print(table(rows, ["pipeline", "seconds", "rows/s", "tokens/s", "vs datasets.map"]))
    print("\nwritten to "
          f"{write('data_pipeline', {'args': vars(args), 'examples': len(examples), 'tokens': tokens, 'rows': rows})}")


if __name__ == "__main__":
    main()
