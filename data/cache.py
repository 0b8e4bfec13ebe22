"""The tokenised-data cache: a materialised dataset saved as Parquet with the key it was made from.

The key hashes the examples, the tokenizer's files and every argument that changes tokenisation, so a
cache is reused only for the same inputs. Writes go to a temporary folder renamed into place, so an
interrupted write never leaves a folder that reads as a valid cache.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import ray.data

from rayft.data.errors import DataError
from rayft.data.tokenizer import TokenizerSpec

META_FILE = "rayft_tokenized.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model")


def cache_key(examples: list[dict], tokenizer: TokenizerSpec, settings: dict) -> str:
    """A hash of the examples, the tokenizer (its files, or its name and revision when not local) and `settings`."""
    digest = hashlib.sha256()
    digest.update(json.dumps({**settings, "tokenizer": tokenizer.identity()}, sort_keys=True).encode())
    folder = Path(tokenizer.path)
    if folder.is_dir():
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                digest.update(name.encode() + (folder / name).read_bytes())

    for example in examples:
        digest.update(json.dumps(example, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()[:24]


def load(folder: Path, key: str, strict: bool):
    """The cached dataset in `folder` if it was made with `key`; None if absent.

    A folder made from other inputs is an error when `strict` (the user named it with tokenized_path),
    so that neither stale data is trained on nor the user's folder overwritten.
    """

    meta_path = folder / META_FILE
    if not meta_path.is_file():
        if strict and folder.exists() and any(folder.iterdir()):
            raise DataError(f"tokenized_path: {folder} exists but holds no rayft tokenised data; choose an empty "
                            "or new folder")
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("key") != key:
        if strict:
            raise DataError(f"tokenized_path: {folder} holds data tokenised from other data or settings "
                            f"({meta.get('settings')}); choose another tokenized_path, or set overwrite_cache: true "
                            "to replace it")
        return None
    return ray.data.read_parquet(str(folder / "data")).materialize()


def save(dataset, folder: Path, key: str, settings: dict) -> None:
    """Writes `dataset` and its key to `folder`, replacing what was there only once the write is complete."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.writing-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    dataset.write_parquet(str(staging / "data"))
    (staging / META_FILE).write_text(json.dumps({"key": key, "settings": settings}, indent=1))
    if folder.exists():
        retired = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.replace(folder, retired)
        os.replace(staging, folder)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, folder)
