"""The readers on their own: tars streamed member by member, image folders, Parquet (HF struct column too),
on local disk and on S3; every broken shard or sample becomes a row that says what was wrong."""

from __future__ import annotations

import io
import os
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bad_corpus import Sample, Symlink, encode, key_samples, noise_jpeg, sample_ids, solid, tar_bytes, write_corpus
from paligemma_batch.config import InputConfig
from paligemma_batch.readers import iter_rows, list_shards

RNG_SEED = 11


def _rows(uri: str, cfg: InputConfig, fields: list[str] | None = None) -> dict:
    return {r.image_id: r for r in iter_rows(uri, cfg, fields)}


def _kind(row) -> str | None:
    return row.error.split(":", 1)[0] if row.error else None


def test_corpus_shards_read_to_their_expected_rows(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    cfg = InputConfig(uri=corpus.shard_uris)
    shards = list_shards(cfg)
    assert corpus.delete_after_listing in shards and str(tmp_path / "corpus" / "missing-shard.tar") in shards
    os.remove(corpus.delete_after_listing)
    rows = {}
    for shard in shards:
        rows.update(_rows(shard, cfg))
    assert set(rows) == set(corpus.expected)
    for image_id, expected in corpus.expected.items():
        row = rows[image_id]
        if expected.outcome in ("ok", "decode", "empty", "too_large"):  # the image decoder's business
            assert row.error is None and row.data is not None, image_id
        else:
            assert _kind(row) == expected.outcome and row.data is None, (image_id, row.error)
    truncated = rows[str(tmp_path / "corpus" / "truncated-mid-member.tar")].error
    assert "unexpected end of data (after 2 rows; the rest of the shard is unread)" in truncated


def test_member_names_are_only_keys_and_nothing_is_extracted(tmp_path, monkeypatch):
    samples = key_samples(np.random.default_rng(RNG_SEED))
    shard = tmp_path / "inner" / "deeper" / "odd-keys.tar"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(tar_bytes(samples))
    monkeypatch.chdir(shard.parent)
    before = sorted(p for p in tmp_path.rglob("*"))
    rows = _rows(str(shard), InputConfig(uri=str(shard)))
    assert sorted(tmp_path.rglob("*")) == before
    assert not Path("/etc/escape-absolute.jpg").exists()
    assert set(rows) == set(sample_ids(str(shard), samples))
    assert rows[f"{shard}::../../escape-dotdot"].data.startswith(b"\xff\xd8")
    assert rows[f"{shard}::/etc/escape-absolute"].data.startswith(b"\xff\xd8")
    assert rows[f"{shard}::duplicate-key"].data == rows[f"{shard}::duplicate-key#2"].data
    assert _kind(rows[f"{shard}::symlink-image"]) == "link"
    assert rows[f"{shard}::no-image-member"].error == "no_image: the sample has no image member (found: json, txt)"


def test_sidecars_are_read_and_a_bad_sidecar_spoils_only_its_sample(tmp_path):
    jpeg = noise_jpeg(np.random.default_rng(RNG_SEED), 8, 8)
    samples = [
        Sample("good sidecars", "good", [("jpg", jpeg), ("json", b'{"question": "why?"}'), ("txt", b" hi \n")], "ok"),
        Sample("json that is a list", "json-list", [("jpg", jpeg), ("json", b"[1, 2]")], "bad_sidecar"),
        Sample("json that does not parse", "json-broken", [("jpg", jpeg), ("json", b"{nope")], "bad_sidecar"),
        Sample("txt that is not UTF-8", "txt-latin1", [("jpg", jpeg), ("txt", "café".encode("latin-1"))],
               "bad_sidecar"),
        Sample("sidecar that is a symlink", "json-link", [("jpg", jpeg), ("json", Symlink("/etc/passwd"))], "ok"),
        Sample("after the bad ones", "after", [("jpg", jpeg), ("txt", b"still read")], "ok"),
    ]
    shard = tmp_path / "sidecars.tar"
    shard.write_bytes(tar_bytes(samples))
    rows = _rows(str(shard), InputConfig(uri=str(shard)), ["json.question", "txt"])
    assert rows[f"{shard}::good"].fields == {"json.question": "why?", "txt": "hi"}
    for sample in samples:
        assert _kind(rows[f"{shard}::{sample.key}"]) == (None if sample.outcome == "ok" else sample.outcome)
    assert rows[f"{shard}::json-list"].error == "bad_sidecar: the json member is a list, not an object"
    assert rows[f"{shard}::json-link"].fields == {}
    assert rows[f"{shard}::after"].fields == {"txt": "still read"}


def _tar_of(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_tar_is_streamed_member_by_member(tmp_path):
    """Peak memory follows one member, not the shard, and tar headers are not kept as the stream goes on."""
    member_bytes, members = 1 << 20, 32
    big = tmp_path / "big-members.tar"
    big.write_bytes(_tar_of([(f"s{i:04d}.jpg", os.urandom(member_bytes)) for i in range(members)]))
    many = tmp_path / "many-members.tar"
    count = 4000
    many.write_bytes(_tar_of([(f"s{i:06d}.jpg", b"x") for i in range(count)]))
    peaks = {}
    for shard in (big, many):
        tracemalloc.start()
        read = sum(1 for _ in iter_rows(str(shard), InputConfig(uri=str(shard))))
        peaks[shard.name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert read == (members if shard is big else count)
    print(f"peak traced memory: {peaks['big-members.tar'] / 1e6:.2f} MB for a {members} MB tar of 1 MB members; "
          f"{peaks['many-members.tar'] / count:.0f} B per sample over {count} tiny samples")
    assert peaks["big-members.tar"] < 5 * member_bytes
    assert peaks["many-members.tar"] < 250 * count  # the key set for duplicate detection, not every TarInfo


def test_image_folder(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub dir").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    files = {
        folder / "plain.jpg": encode(solid((5, 4), (1, 2, 3)), "JPEG"),
        folder / "sub dir" / "ünï cödé.PNG": encode(solid((3, 2), (1, 2, 3)), "PNG"),
        folder / "zero-byte.png": b"",
        folder / "going-away.png": encode(solid((3, 2), (1, 2, 3)), "PNG"),
    }
    for path, data in files.items():
        path.write_bytes(data)
    (folder / "notes.txt").write_text("not listed")
    (folder / "_SUCCESS.jpg").write_bytes(b"marker")
    (folder / ".hidden.jpg").write_bytes(b"hidden")
    cfg = InputConfig(uri=str(folder), format="images")
    shards = list_shards(cfg)
    assert shards == sorted(str(p) for p in files)
    (folder / "going-away.png").unlink()
    rows = {}
    for shard in shards:
        rows.update(_rows(shard, cfg))
    assert rows[str(folder / "plain.jpg")].data == files[folder / "plain.jpg"]
    assert rows[str(folder / "sub dir" / "ünï cödé.PNG")].error is None
    assert rows[str(folder / "zero-byte.png")].data == b"" and rows[str(folder / "zero-byte.png")].error is None
    assert _kind(rows[str(folder / "going-away.png")]) == "missing_shard"


def _parquet(path: Path, table: pa.Table, **kwargs) -> str:
    pq.write_table(table, path, **kwargs)
    return str(path)


def test_parquet_binary_and_hf_struct_columns(tmp_path):
    jpeg = encode(solid((6, 5), (9, 9, 9)), "JPEG")
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "key": ["a", "b", "a", None, "c"],
        "image": pa.array([{"bytes": jpeg, "path": "a.jpg"}, {"bytes": None, "path": "/data/b.jpg"},
                           {"bytes": jpeg, "path": None}, {"bytes": jpeg, "path": None}, None], image_type),
        "question": ["q1", None, "q3", "q4", "q5"],
    })
    uri = _parquet(tmp_path / "hf.parquet", table, row_group_size=2)
    rows = _rows(uri, InputConfig(uri=uri, format="parquet", id_column="key"), ["question"])
    assert list(rows) == [f"{uri}::a", f"{uri}::b", f"{uri}::a#2", f"{uri}::@row3", f"{uri}::c"]
    assert rows[f"{uri}::a"].data == jpeg and rows[f"{uri}::a"].fields == {"question": "q1"}
    assert rows[f"{uri}::b"].error == "no_image: image.bytes is null (path: '/data/b.jpg'; paths are not followed)"
    assert rows[f"{uri}::@row3"].error == "null_id: key is null in row 3"
    assert rows[f"{uri}::c"].error == "no_image: image is null"

    plain = _parquet(tmp_path / "plain.parquet", pa.table({"img": pa.array([jpeg, b""], pa.large_binary())}))
    rows = _rows(plain, InputConfig(uri=plain, format="parquet", image_key="img"))
    assert [r.data for r in rows.values()] == [jpeg, b""] and list(rows) == [f"{plain}::0", f"{plain}::1"]


@pytest.mark.parametrize(
    "case, expected",
    [
        ("image column of the wrong type", "bad_shard: TypeError: column 'image' is int64; expected binary"),
        ("missing image column", "bad_shard: KeyError: \"missing column(s) ['image']"),
        ("not a parquet file", "bad_shard: ArrowInvalid:"),
        ("no rows", "empty_shard:"),
    ],
)
def test_broken_parquet_files_become_one_error_row(tmp_path, case, expected):
    path = tmp_path / "broken.parquet"
    if case == "image column of the wrong type":
        _parquet(path, pa.table({"image": [1, 2]}))
    elif case == "missing image column":
        _parquet(path, pa.table({"picture": [b"x"]}))
    elif case == "not a parquet file":
        path.write_bytes(b"PAR1 this is not really parquet")
    else:
        _parquet(path, pa.table({"image": pa.array([], pa.binary())}))
    rows = list(iter_rows(str(path), InputConfig(uri=str(path), format="parquet")))
    assert len(rows) == 1 and rows[0].image_id == str(path) and rows[0].error.startswith(expected), rows[0].error


def test_tar_shards_on_s3(s3_bucket, s3_endpoint):
    fs, bucket = s3_bucket
    samples = key_samples(np.random.default_rng(RNG_SEED))
    fs.pipe(f"{bucket}/shards/odd-keys.tar", tar_bytes(samples))
    fs.pipe(f"{bucket}/shards/empty.tar", b"")
    storage = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    cfg = InputConfig(uri=[f"s3://{bucket}/shards/*.tar", f"s3://{bucket}/shards/missing.tar"],
                      storage_options=storage)
    shards = list_shards(cfg)
    assert shards == [f"s3://{bucket}/shards/{n}" for n in ("empty.tar", "missing.tar", "odd-keys.tar")]
    rows = {}
    for shard in shards:
        rows.update(_rows(shard, cfg))
    expected = sample_ids(f"s3://{bucket}/shards/odd-keys.tar", samples)
    assert set(rows) == set(expected) | {f"s3://{bucket}/shards/empty.tar", f"s3://{bucket}/shards/missing.tar"}
    assert _kind(rows[f"s3://{bucket}/shards/empty.tar"]) == "empty_shard"
    assert _kind(rows[f"s3://{bucket}/shards/missing.tar"]) == "missing_shard"
    assert all(_kind(rows[i]) == (None if e.outcome == "ok" else e.outcome) for i, e in expected.items())


def test_one_id_rule_for_the_job_the_evaluation_and_the_benchmarks(tmp_path, tiny_model_dir, ray_local):
    """The same tar member gets the same ``image_id`` in the job's output, the evaluation's ground truth and the
    benchmarks' image reader, also when the key has dots in it (a WebDataset key ends at the basename's first dot)."""
    import json
    import sys

    from conftest import job_config
    from paligemma_batch.evaluate import read_ground_truth
    from paligemma_batch.pipeline import run
    from paligemma_batch.results import read_results

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from _common import tar_images

    shard = tmp_path / "set.v1.tar"
    members = [("0001.jpg", encode(solid((40, 30), (200, 0, 0)), "JPEG")),
               ("0001.json", json.dumps({"caption": "red"}).encode())]
    shard.write_bytes(tar_bytes([Sample("key with dots", "batch.2026/cat", members, "ok")]))
    run(job_config(tiny_model_dir, str(shard), str(tmp_path / "out"), tasks=[{"task": "caption", "lang": "en"}]))
    from_job = set(read_results(str(tmp_path / "out"))["image_id"].to_pylist())
    from_evaluation = set(read_ground_truth([str(shard)], InputConfig(uri=str(shard)).storage_options))
    from_benchmarks = {image_id for image_id, _ in tar_images([shard])}
    assert from_job == from_evaluation == from_benchmarks == {f"{shard}::batch.2026/cat"}
