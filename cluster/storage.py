"""What a run's storage (`ray_storage_path/ray_run_name`, local or a URI) already holds from an earlier run."""

import json
import time

import pyarrow.fs
import yaml

from rayft.recipe.problems import ConfigError, Problem

# Ray Train V2 records the run's reported checkpoints in this file and restores from it when a run with the
# same name and storage starts again; a checkpoint enters it only once fully written.
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def filesystem(name: str | None):
    """The pyarrow file system `ray_storage_filesystem` names (s3, or gs/gcs), or None for Ray's choice.

    Credentials come from the environment as usual for each cloud (instance roles, env vars, ...).
    """
    if name is None:
        return None

    return pyarrow.fs.S3FileSystem() if name == "s3" else pyarrow.fs.GcsFileSystem()


def _resolve(storage_path: str, fs_name: str | None = None):

    if fs_name is not None:
        return filesystem(fs_name), storage_path.split("://", 1)[-1]
    if "://" in storage_path:
        return pyarrow.fs.FileSystem.from_uri(storage_path)
    return pyarrow.fs.LocalFileSystem(), storage_path


def upload_outputs(output_dir: str, storage_path: str, run_name: str, fs_name: str | None = None) -> str:
    """Copies the finished run's output_dir to `<storage>/<run_name>/output`, where every node and the user
    can reach it (output_dir itself is on the disk of rank 0's node). Returns the destination."""

    fs, root = _resolve(storage_path, fs_name)
    destination = f"{root.rstrip('/')}/{run_name}/output"
    fs.create_dir(destination, recursive=True)
    pyarrow.fs.copy_files(output_dir, destination, source_filesystem=pyarrow.fs.LocalFileSystem(),
                          destination_filesystem=fs)
    return f"{storage_path.rstrip('/')}/{run_name}/output"


def latest_checkpoint(storage_path: str, run_name: str | None, fs_name: str | None = None) -> str | None:
    """The latest checkpoint an earlier run named `run_name` reported to `storage_path`, or None."""

    if not run_name:
        return None  # Ray names an unnamed run uniquely: nothing to resume
    fs, root = _resolve(storage_path, fs_name)
    snapshot = f"{root.rstrip('/')}/{run_name}/{SNAPSHOT_FILE}"
    if fs.get_file_info(snapshot).type == pyarrow.fs.FileType.NotFound:
        return None
    state = _read_snapshot(fs, snapshot)
    latest = state.get("latest_checkpoint_result") or {}
    name = latest.get("checkpoint_dir_name")
    return f"{storage_path.rstrip('/')}/{run_name}/{name}" if name else None


def checkpoint_recipe(checkpoint: str, fs_name: str | None = None) -> dict | None:
    """The resolved recipe a checkpoint (as latest_checkpoint names it) was saved with, or None for a checkpoint of
    a run that saved none (before rayft wrote it into checkpoints)."""
    fs, root = _resolve(checkpoint, fs_name)
    path = f"{root.rstrip('/')}/checkpoint/training_args.yaml"
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return yaml.safe_load(f.read().decode())


def _read_snapshot(fs, path: str, attempts: int = 10) -> dict:
    """Ray Train's checkpoint record, read while its controller may be rewriting it: a read that meets a file
    being written (a local file is rewritten in place; S3 emulators serve a PUT as it arrives) is tried again."""
    for attempt in range(attempts):
        with fs.open_input_stream(path) as f:
            text = f.read().decode()
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            if attempt == attempts - 1:
                raise ConfigError([Problem("ray_run_name", f"{path} is not a whole JSON record ({err}); Ray Train "
                                                           "cannot resume from it either: move it away, or choose "
                                                           "another ray_run_name")]) from None
            time.sleep(0.2)


def checkpoint_at(uri: str, fs_name: str | None = None):
    """The Ray Train checkpoint stored at `uri` (as latest_checkpoint names it), for a run that starts from a
    checkpoint another run wrote (a pbt trial's next segment)."""
    from ray.train import Checkpoint

    fs, path = _resolve(uri, fs_name)
    return Checkpoint(path, filesystem=fs)

