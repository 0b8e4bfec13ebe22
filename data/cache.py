"""The tokenised-data cache: a materialised dataset saved as Parquet with the key it was made from, in a local
folder or under an s3:// / gs:// URI.

The key hashes what the rows are made from (each dataset's files with their sizes and modification times, and
every setting that selects rows), the tokenizer's files and every argument that changes tokenisation, so a
cache is reused only for the same inputs and is found without reading the datasets. The key file is written
last: a folder without it (an interrupted write) never reads as a valid cache.
"""

import hashlib
import json
from pathlib import Path

import pyarrow.fs

from rayft.data.errors import DataError
from rayft.data.files import resolve
from rayft.data.tokenizer import TokenizerSpec

META_FILE = "rayft_tokenized.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model")


def cache_key(identity: dict, tokenizer: TokenizerSpec, settings: dict) -> str:
    """A hash of the rows' `identity`, the tokenizer (its files, or its name and revision when not local) and
    `settings`."""
    digest = hashlib.sha256()
    digest.update(json.dumps({**settings, "tokenizer": tokenizer.identity(), "rows": identity}, sort_keys=True,
                             default=str).encode())
    folder = Path(tokenizer.path)
    if folder.is_dir():
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                digest.update(name.encode() + (folder / name).read_bytes())
    return digest.hexdigest()[:24]


def load(folder: str, key: str, strict: bool):
    """The cached dataset in `folder` if it was made with `key`; None if absent.

    A folder made from other inputs is an error when `strict` (the user named it with tokenized_path),
    so that neither stale data is trained on nor the user's folder overwritten.
    """
    import ray.data

    fs, path = resolve(folder)
    meta_path = f"{path}/{META_FILE}"
    if fs.get_file_info(meta_path).type == pyarrow.fs.FileType.NotFound:
        if strict and fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True)):
            raise DataError(f"tokenized_path: {folder} exists but holds no rayft tokenised data; choose an empty "
                            "or new folder")
        return None
    with fs.open_input_stream(meta_path) as stream:
        meta = json.loads(stream.read().decode())
    if meta.get("key") != key:
        if strict:
            raise DataError(f"tokenized_path: {folder} holds data tokenised from other data or settings "
                            f"({meta.get('settings')}); choose another tokenized_path, or set overwrite_cache: true "
                            "to replace it")
        return None
    return ray.data.read_parquet(f"{path}/data", filesystem=fs).materialize()


def save(dataset, folder: str, key: str, settings: dict) -> None:
    """Writes `dataset` (in parallel, by Ray Data's tasks) and then its key to `folder`, after removing an
    earlier cache there; until the key file is written the folder is not a valid cache."""
    fs, path = resolve(folder)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(path)
    fs.create_dir(path, recursive=True)
    dataset.write_parquet(f"{path}/data", filesystem=fs)
    with fs.open_output_stream(f"{path}/{META_FILE}") as stream:
        stream.write(json.dumps({"key": key, "settings": settings}, indent=1).encode())
