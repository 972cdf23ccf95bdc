"""S3 sources against a local moto server: anonymous and signed reads, bad objects, listings, missing prefixes."""

from __future__ import annotations

import json
from collections import Counter

import boto3
import pytest
from botocore import UNSIGNED

from counting.dataset import pack_dataset
from counting.sources import list_items, load_items, read_source, shard_items
from counting.sources.s3 import make_client

PUBLIC = "aft-vbi-pds"
PRIVATE = "private-bin-photos"
PREFIX = "abid/v1"
GOOD = {f"{i:05d}": i % 6 for i in range(1, 17)}  # counts 0..5
BROKEN = {"90001": "truncated", "90002": "no metadata", "90003": "malformed", "90004": "no count", "90005": "nine"}


def bucket_layout(tiny_jpeg) -> dict[str, bytes]:
    """Object key (relative to the layout root) -> body: good images plus one of each kind of broken input."""
    objects = {}
    for seed, (id_, count) in enumerate(GOOD.items()):
        objects[f"bin-images/{id_}.jpg"] = tiny_jpeg(seed, 16)
        objects[f"metadata/{id_}.json"] = json.dumps({"BIN_FCSKU_DATA": {}, "EXPECTED_QUANTITY": count}).encode()
    jpeg = tiny_jpeg(99, 16)
    for id_ in BROKEN:
        objects[f"bin-images/{id_}.jpg"] = jpeg
        objects[f"metadata/{id_}.json"] = b'{"EXPECTED_QUANTITY": 2}'
    objects["bin-images/90001.jpg"] = jpeg[: len(jpeg) // 2]
    del objects["metadata/90002.json"]
    objects["metadata/90003.json"] = b'{"EXPECTED_QUANTITY": '
    objects["metadata/90004.json"] = b'{"BIN_FCSKU_DATA": {}}'
    objects["metadata/90005.json"] = b'{"EXPECTED_QUANTITY": 9}'
    return objects


@pytest.fixture(scope="module")
def buckets(moto_server, tiny_jpeg):
    """A public bucket laid out like aft-vbi-pds at its root, and a private one with the layout under PREFIX."""
    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    client.create_bucket(Bucket=PUBLIC, ACL="public-read")
    client.create_bucket(Bucket=PRIVATE)
    for key, body in bucket_layout(tiny_jpeg).items():
        client.put_object(Bucket=PUBLIC, Key=key, Body=body, ACL="public-read")
        client.put_object(Bucket=PRIVATE, Key=f"{PREFIX}/{key}", Body=body)
    return client


@pytest.fixture
def no_credentials(aws_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    return aws_env


def kinds(skipped) -> Counter:
    return Counter(skip.reason.split(":", 1)[0] for skip in skipped)


def assert_reads_layout(result, root: str) -> None:
    in_range = {id_: count for id_, count in GOOD.items() if 1 <= count <= 5}
    assert {r.id: r.count for r in result.records} == {**in_range, "90001": 2}
    assert all(r.key == f"{root}/bin-images/{r.id}.jpg" for r in result.records)
    out_of_range = sum(not 1 <= count <= 5 for count in GOOD.values()) + 1  # + the image labelled 9
    assert kinds(result.skipped) == {"count out of range": out_of_range, "image without metadata": 1,
                                     "malformed metadata JSON": 1, "metadata without EXPECTED_QUANTITY": 1}
    assert {s.key for s in result.skipped if "metadata" in s.reason.split(":")[0]} == {
        f"{root}/bin-images/90002.jpg", f"{root}/metadata/90003.json", f"{root}/metadata/90004.json"}


def test_public_bucket_is_read_anonymously_without_credentials(buckets, no_credentials):
    result = read_source(f"s3://{PUBLIC}", workers=4, progress=False)
    assert_reads_layout(result, f"s3://{PUBLIC}")
    assert make_client(PUBLIC).meta.config.signature_version is UNSIGNED
    assert make_client(PRIVATE).meta.config.signature_version is not UNSIGNED

    packed = pack_dataset(result.records, 16, result.skipped, progress=False)
    assert "90001" not in packed.ids and len(packed) == len(result.records) - 1
    truncated = [s for s in packed.skipped if s["key"] == f"s3://{PUBLIC}/bin-images/90001.jpg"]
    assert truncated and truncated[0]["reason"].startswith("unreadable image")


def test_private_prefix_is_read_with_credentials(buckets, aws_env):
    result = read_source(f"s3://{PRIVATE}/{PREFIX}/", workers=4, progress=False)
    assert_reads_layout(result, f"s3://{PRIVATE}/{PREFIX}")


def test_anonymous_read_of_private_bucket_is_refused_clearly(buckets, aws_env):
    with pytest.raises(PermissionError, match=f"s3://{PRIVATE}/{PREFIX}.*access denied.*unsigned"):
        read_source(f"s3://{PRIVATE}/{PREFIX}", anonymous=True, progress=False)


def test_private_bucket_without_credentials_says_so(buckets, no_credentials):
    with pytest.raises(PermissionError, match=f"s3://{PRIVATE}/{PREFIX}: no AWS credentials"):
        read_source(f"s3://{PRIVATE}/{PREFIX}", progress=False)


@pytest.mark.parametrize("uri, culprit", [(f"s3://{PRIVATE}/no/such/prefix", "no objects under this prefix"),
                                          ("s3://no-such-bucket/data", "bucket 'no-such-bucket' does not exist")])
def test_missing_prefix_or_bucket_is_named(buckets, aws_env, uri, culprit):
    with pytest.raises(FileNotFoundError, match=f"{uri}: {culprit}"):
        read_source(uri, progress=False)


def test_file_list_selects_and_labels_s3_images(buckets, aws_env, tmp_path):
    listing = tmp_path / "file_list.json"
    listing.write_text(json.dumps({"4": ["data/metadata/00001.json", "data/metadata/00002.json"],
                                   "5": ["data/metadata/00003.json", "data/metadata/77777.json"]}))
    result = read_source(f"s3://{PRIVATE}/{PREFIX}", subset=str(listing), progress=False)
    assert [(r.id, r.count) for r in result.records] == [("00001", 4), ("00002", 4), ("00003", 5)]
    assert [(s.key, s.reason.split(":")[0]) for s in result.skipped] == [
        (f"s3://{PRIVATE}/{PREFIX}/bin-images/77777.jpg", "file not found")]


def test_shards_loaded_separately_match_one_load(buckets, aws_env):
    listing = list_items(f"s3://{PRIVATE}/{PREFIX}", max_per_class=2, progress=False)
    assert max(Counter(item.count for item in listing.items).values()) == 2
    shards = shard_items(listing.items, 3)
    records = [record for shard in shards for record in load_items(shard, workers=2, progress=False).records]
    assert records == load_items(listing.items, progress=False).records
    assert [r.id for r in records] == [item.id for item in listing.items]


def test_service_specific_endpoint_wins(buckets, aws_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", aws_env)
    records = read_source(f"s3://{PRIVATE}/{PREFIX}", progress=False).records
    assert len(records) == sum(1 <= count <= 5 for count in GOOD.values()) + 1  # + the truncated image
