"""ABID layouts on S3: `s3://bucket/prefix` holding `bin-images/` and `metadata/`.

Requests are unsigned (anonymous) for the public `aft-vbi-pds` bucket by default, or whenever
`anonymous=True`; otherwise boto3 finds the user's credentials as usual. `AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL` points the client at another S3-compatible endpoint.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import boto3
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from counting.sources.base import FetchError

PUBLIC_BUCKETS = {"aft-vbi-pds": "us-east-1"}  # public bucket -> its region
MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
DENIED_CODES = frozenset({"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "InvalidAccessKeyId",
                          "SignatureDoesNotMatch", "ExpiredToken"})


def is_s3_uri(uri: str) -> bool:
    return uri.startswith("s3://")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split `s3://bucket/prefix` into (bucket, prefix without surrounding slashes)."""
    if not is_s3_uri(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"S3 URI without a bucket: {uri!r}")
    return bucket, prefix.strip("/")


def use_anonymous(bucket: str, anonymous: bool | None) -> bool:
    """Unsigned requests when asked for, or by default for the public ABID bucket."""
    return bucket in PUBLIC_BUCKETS if anonymous is None else anonymous


def make_client(bucket: str, anonymous: bool | None = None, workers: int = 16):
    """A thread-safe boto3 S3 client for `bucket`, sized for `workers` concurrent downloads."""
    config = Config(max_pool_connections=max(10, workers),
                    signature_version=UNSIGNED if use_anonymous(bucket, anonymous) else None)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=PUBLIC_BUCKETS.get(bucket),
                                          config=config)


def _access_hint(bucket: str, anonymous: bool | None) -> str:
    if use_anonymous(bucket, anonymous):
        return "requests were unsigned; pass anonymous=False to use your AWS credentials"
    return "check your AWS credentials, or pass anonymous=True for a public bucket"


@contextmanager
def _source_errors(uri: str, bucket: str, anonymous: bool | None) -> Iterator[None]:
    """Turn boto errors about a whole source into FileNotFoundError / PermissionError / ConnectionError naming it."""
    try:
        yield
    except NoCredentialsError:
        raise PermissionError(f"{uri}: no AWS credentials found; configure them or pass anonymous=True "
                              "for a public bucket") from None
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            raise FileNotFoundError(f"{uri}: bucket {bucket!r} does not exist") from None
        if code in DENIED_CODES:
            raise PermissionError(f"{uri}: access denied ({_access_hint(bucket, anonymous)})") from None
        raise OSError(f"{uri}: cannot list ({code}: {error})") from None
    except BotoCoreError as error:
        raise ConnectionError(f"{uri}: cannot reach S3 ({error})") from None


def read_object(client, uri: str) -> bytes:
    """The body of the object at `uri`; a FetchError names it and says why it could not be read."""
    bucket, key = parse_s3_uri(uri)
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code in MISSING_CODES:
            raise FetchError(f"file not found: {uri}") from None
        if code in DENIED_CODES:
            raise FetchError(f"access denied: {uri}") from None
        raise FetchError(f"cannot read: {uri}: {code}") from None
    except NoCredentialsError:
        raise FetchError(f"no AWS credentials: {uri}") from None
    except BotoCoreError as error:
        raise FetchError(f"cannot read: {uri}: {error}") from None


class S3Store:
    """An ABID layout under `s3://bucket/prefix` (a LayoutStore)."""

    def __init__(self, uri: str, anonymous: bool | None = None, workers: int = 16) -> None:
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.root = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.anonymous = anonymous
        self.client = make_client(self.bucket, anonymous, workers)

    def _prefix(self, folder: str = "") -> str:
        parts = [part for part in (self.prefix, folder) if part]
        return "/".join(parts) + "/" if parts else ""

    def check(self) -> None:
        """Fail early, naming the source, when the prefix is empty or its objects cannot be listed or read."""
        with _source_errors(self.root, self.bucket, self.anonymous):
            found = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._prefix(), MaxKeys=1)
            if not found.get("KeyCount"):
                raise FileNotFoundError(f"{self.root}: no objects under this prefix")
            self.client.head_object(Bucket=self.bucket, Key=found["Contents"][0]["Key"])

    def names(self, folder: str) -> list[str]:
        prefix = self._prefix(folder)
        names = []
        with _source_errors(f"{self.root}/{folder}", self.bucket, self.anonymous):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for entry in page.get("Contents", []):
                    name = entry["Key"][len(prefix):]
                    if name and "/" not in name and not name.startswith("."):
                        names.append(name)
        return sorted(names)

    def key(self, folder: str, name: str) -> str:
        return f"s3://{self.bucket}/{self._prefix(folder)}{name}"

    def read(self, key: str) -> bytes:
        return read_object(self.client, key)


class S3Reader:
    """Reads s3:// URIs from any bucket, with one shared client per bucket (created on first use)."""

    def __init__(self, anonymous: bool | None = None, workers: int = 16) -> None:
        self.anonymous = anonymous
        self.workers = workers
        self._clients: dict[str, object] = {}
        self._lock = threading.Lock()

    def _client(self, bucket: str):
        with self._lock:
            if bucket not in self._clients:
                self._clients[bucket] = make_client(bucket, self.anonymous, self.workers)
            return self._clients[bucket]

    def __call__(self, uri: str) -> bytes:
        return read_object(self._client(parse_s3_uri(uri)[0]), uri)
