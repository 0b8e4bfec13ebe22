"""What a run's storage (`ray_storage_path/ray_run_name`, local or a URI) already holds from an earlier run."""

import json

# Ray Train V2 records the run's reported checkpoints in this file and restores from it when a run with the
# same name and storage starts again; a checkpoint enters it only once fully written.
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def latest_checkpoint(storage_path: str, run_name: str | None) -> str | None:
    """The latest checkpoint an earlier run named `run_name` reported to `storage_path`, or None."""
    import pyarrow.fs

    if not run_name:
        return None  # Ray names an unnamed run uniquely: nothing to resume
    if "://" in storage_path:
        fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
    else:
        fs, root = pyarrow.fs.LocalFileSystem(), storage_path
    snapshot = f"{root.rstrip('/')}/{run_name}/{SNAPSHOT_FILE}"
    if fs.get_file_info(snapshot).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(snapshot) as f:
        state = json.loads(f.read().decode())
    latest = state.get("latest_checkpoint_result") or {}
    name = latest.get("checkpoint_dir_name")
    return f"{storage_path.rstrip('/')}/{run_name}/{name}" if name else None
