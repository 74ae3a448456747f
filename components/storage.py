"""Storage for the pipeline phases: local paths and ``s3://`` URIs (MinIO), with retries and named errors.

The implementation lives in `serving.storage` (the predictor reads bundles from S3 too, and serving imports
nothing from components/); this module is the components-side name for it.
"""

from serving.storage import (
    ObjectNotFound,
    S3AuthError,
    S3BucketMissing,
    S3ConnectionError,
    StorageError,
    delete,
    download_file,
    download_prefix,
    ensure_bucket,
    exists,
    is_s3,
    join,
    list_uris,
    read_bytes,
    sha256_of,
    split_s3,
    upload_file,
    write_bytes,
)

__all__ = [
    "ObjectNotFound",
    "S3AuthError",
    "S3BucketMissing",
    "S3ConnectionError",
    "StorageError",
    "delete",
    "download_file",
    "download_prefix",
    "ensure_bucket",
    "exists",
    "is_s3",
    "join",
    "list_uris",
    "read_bytes",
    "sha256_of",
    "split_s3",
    "upload_file",
    "write_bytes",
]
