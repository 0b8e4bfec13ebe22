"""`rayft data`: the first encoded examples of every dataset, exactly as the workers receive them, as JSON Lines.

Runs on the driver without Ray: datasets are read and converted, then encoded by the stage's own encoder (and
packed when packing is on), so a template, a truncation or a migration from LLaMA-Factory can be checked by eye
or by a script before any cluster is reserved.
"""

import json
from pathlib import Path

from rayft.data.encode import IGNORE_INDEX
from rayft.data.packing import pack_batch
from rayft.data.pipeline import (
    EncodingSettings,
    check_encoding,
    columns_of,
    locate_datasets,
    shortened_runs,
    stage_encoder,
)
from rayft.data.source import head_and_bad_rows
from rayft.data.tokenizer import TokenizerSpec, load_tokenizer
from rayft.recipe.config import RecipeConfig
from rayft.recipe.logs import logger
from rayft.recipe.stages import STAGE_SPECS
from rayft.recipe.values import comma_list

SEQUENCE_KEYS = ("input_ids", "chosen_input_ids", "rejected_input_ids", "kl_input_ids")


def write_examples(cfg: RecipeConfig, count: int, out: Path) -> int:
    """Writes the first `count` encoded examples of each training and evaluation dataset to `out`; returns the
    number of rows written."""
    d, stage, encoder = cfg.data, STAGE_SPECS[cfg.finetuning.stage], stage_encoder(cfg.finetuning.stage)
    spec, settings = TokenizerSpec.of(cfg.model), EncodingSettings.of(cfg)
    settings.chat_template()  # an unknown or multimodal template is refused before any data is read
    tokenizer = load_tokenizer(spec)
    locate = dict(data=stage.data, stage=cfg.finetuning.stage, token=cfg.model.hf_hub_token, template=d.template,
                  media_dir=d.media_dir)
    rows = []
    for split, names in (("train", d.dataset), ("eval", d.eval_dataset)):
        if not names:
            continue
        datasets = []
        for name, source in zip(comma_list(names), locate_datasets(names, d.dataset_dir, **locate)):
            examples, bad = head_and_bad_rows(source, count)
            if bad:  # left out, as a run leaves them out: said, never silently
                logger.info(f"dataset {name!r}: {len(bad)} of its first {count} rows are malformed and left out "
                            f"({'; '.join(bad[:3])}{'; ...' if len(bad) > 3 else ''})")
            datasets.append(examples)
        check_encoding(names, datasets, spec, settings, encoder)
        for name, examples in zip(comma_list(names), datasets):
            rows += [{"split": split, "dataset": name, "index": i, **row}
                     for i, row in enumerate(encoded_rows(examples[:count], spec, settings, encoder, tokenizer))]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    logger.info(f"wrote {len(rows)} encoded examples to {out}")
    return len(rows)


def encoded_rows(examples: list[dict], spec: TokenizerSpec, settings: EncodingSettings, encoder, tokenizer
                 ) -> list[dict]:
    """The examples encoded (and packed) as the workers get them, each sequence with its decoded text and the
    decoded text of its trained tokens."""
    if not examples:
        return []
    batch = encoder(columns_of(examples), tokenizer_spec=spec, settings=settings)
    if settings.packs_after_encoding:
        batch = pack_batch(batch, cutoff_len=settings.cutoff_len, neat=settings.neat_packing)
    columns = {k: v for k, v in batch.items() if k.endswith(("input_ids", "labels")) or k in ("kto_tag", "images")}
    rows = []
    for values in zip(*columns.values()):
        row = {k: (bool(v) if k == "kto_tag" else json.loads(v) if k == "images" else [int(i) for i in v])
               for k, v in zip(columns, values)}
        for key in SEQUENCE_KEYS:
            if key in row:
                side = key.removesuffix("input_ids")
                row[f"{side}text"] = shortened_runs(tokenizer.decode(row[key], skip_special_tokens=False))
                labels = row.get(f"{side}labels")
                if labels is not None:
                    trained = [t for t, label in zip(row[key], labels) if label != IGNORE_INDEX]
                    row[f"{side}trained_text"] = tokenizer.decode(trained, skip_special_tokens=False)
        rows.append(row)
    return rows
