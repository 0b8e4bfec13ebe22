"""Local paths and s3:// / gs:// URIs as one pyarrow file system and path, for datasets and caches alike."""

from pathlib import Path

import pyarrow as pa
import pyarrow.fs

from rayft.data.errors import DataError


def resolve(location: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The file system and path of a local path or a URI (s3://, gs://, file://).

    S3 endpoints and credentials come as for any AWS client: AWS_ENDPOINT_URL (MinIO and other S3-compatible
    stores), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, or the instance's role.
    """
    if "://" in location:
        try:
            return pyarrow.fs.FileSystem.from_uri(location)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{location}: {err}") from None
    return pyarrow.fs.LocalFileSystem(), str(Path(location).resolve())


def read_text(location: str) -> str | None:
    """A small text file (dataset_info.json) from a local path or a URI; None when there is none."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return stream.read().decode("utf-8")
