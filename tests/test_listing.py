"""Every shard the user names is read: brace ranges and lists, ``**`` globs, compressed tars, every image format
Pillow decodes (any case), and the files a listing leaves out are counted by extension."""

from __future__ import annotations

import gzip
import io

import pytest
from PIL import Image

from bad_corpus import Sample, encode, solid, tar_bytes
from paligemma_batch.config import InputConfig
from paligemma_batch.readers import expand_braces, iter_rows, list_shards


@pytest.mark.parametrize("pattern, expected", [
    ("s-{000..002}.tar", ["s-000.tar", "s-001.tar", "s-002.tar"]),
    ("s-{8..11}.tar", ["s-8.tar", "s-9.tar", "s-10.tar", "s-11.tar"]),
    ("{train,val}/x-{0..1}.tar", ["train/x-0.tar", "train/x-1.tar", "val/x-0.tar", "val/x-1.tar"]),
    ("a{b,c{d,e}}f", ["abf", "acdf", "acef"]),
    ("s-{0..4..2}.tar", ["s-0.tar", "s-2.tar", "s-4.tar"]),
    ("{x}/plain{.tar", ["{x}/plain{.tar"]),
])
def test_brace_notation(pattern, expected):
    assert expand_braces(pattern) == expected


def _tar(samples: int, prefix: str) -> bytes:
    return tar_bytes([Sample(prefix, f"{prefix}-{i}", [("jpg", encode(solid((4, 3), (i, 0, 0)), "JPEG"))], "ok")
                      for i in range(samples)])


def _count_rows(cfg: InputConfig) -> tuple[list[str], int]:
    shards = list_shards(cfg)
    rows = [r for s in shards for r in iter_rows(s, cfg)]
    assert all(r.error is None for r in rows), [r.error for r in rows if r.error]
    return shards, len(rows)


def test_a_folder_mixing_tar_and_compressed_tars_is_read_whole(tmp_path):
    folder = tmp_path / "mixed"
    (folder / "deep" / "er").mkdir(parents=True)
    (folder / "a.tar").write_bytes(_tar(3, "a"))
    (folder / "b.tar.gz").write_bytes(gzip.compress(_tar(2, "b")))
    (folder / "deep" / "c.TGZ").write_bytes(gzip.compress(_tar(4, "c")))
    (folder / "deep" / "er" / "d.tar").write_bytes(_tar(1, "d"))
    (folder / "README.md").write_text("not a shard")
    (folder / "deep" / "index.json").write_text("{}")
    shards, rows = _count_rows(InputConfig(uri=str(folder)))
    assert len(shards) == 4 and rows == 10
    assert list_shards(InputConfig(uri=str(folder))).skipped == {"md": 1, "json": 1}
    shards, rows = _count_rows(InputConfig(uri=str(folder / "**" / "*")))
    assert len(shards) == 4 and rows == 10


def test_a_brace_range_uri_is_read_whole(tmp_path):
    for i in range(4):
        (tmp_path / f"shard-{i:06d}.tar").write_bytes(_tar(2, f"s{i}"))
    cfg = InputConfig(uri=str(tmp_path / "shard-{000000..000003}.tar"))
    shards, rows = _count_rows(cfg)
    assert shards == [str(tmp_path / f"shard-{i:06d}.tar") for i in range(4)] and rows == 8
    assert list_shards(cfg).missing == []
    wider = list_shards(InputConfig(uri=str(tmp_path / "shard-{000000..000004}.tar")))
    assert wider.missing == [str(tmp_path / "shard-000004.tar")] and len(wider) == 5  # kept: it becomes an error row


def test_an_image_folder_with_avif_and_upper_case_extensions_is_read_whole(tmp_path):
    images = {"a.avif": "AVIF", "b.JPG": "JPEG", "c.PNG": "PNG", "d.Jpeg": "JPEG", "e.jp2": "JPEG2000",
              "f.qoi": "QOI", "g.TIFF": "TIFF", "h.webp": "WEBP", "i.ppm": "PPM", "j.tga": "TGA"}
    for name, fmt in images.items():
        buf = io.BytesIO()
        Image.new("RGB", (6, 4), (10, 20, 30)).save(buf, fmt)
        (tmp_path / name).write_bytes(buf.getvalue())
    (tmp_path / "notes.txt").write_text("x")
    cfg = InputConfig(uri=str(tmp_path), format="images")
    shards, rows = _count_rows(cfg)
    assert rows == len(images) and sorted(shards) == sorted(str(tmp_path / n) for n in images)
    assert list_shards(cfg).skipped == {"txt": 1}
    # The extension list is additive: adding one keeps every default.
    extra = InputConfig(uri=str(tmp_path), format="images", image_exts=["TXT"])
    assert len(list_shards(extra)) == len(images) + 1


def test_every_listed_image_decodes(tmp_path):
    from paligemma_batch.images import decode_image

    for fmt in ("AVIF", "JPEG2000", "QOI", "TGA", "PPM"):
        buf = io.BytesIO()
        Image.new("RGB", (6, 4), (10, 20, 30)).save(buf, fmt)
        assert decode_image(buf.getvalue(), (8, 8)).width == 6, fmt


def test_s3_globs_and_folders_list_what_fsspec_globs_and_keep_no_listing(s3_bucket, s3_endpoint):
    from paligemma_batch.config import StorageOptions
    from paligemma_batch.storage import filesystem

    fs, bucket = s3_bucket
    keys = ["a/1.tar", "a/2.TAR", "a/x.txt", "a/_hidden.tar", "a/deep/3.tar", "a/deep/er/4.tar.gz", "a/deep/er/y",
            "b/5.tar", "b/deep/6.tar", "ab.tar"]
    fs.pipe({f"{bucket}/{k}": b"" for k in keys})
    storage = StorageOptions(endpoint_url=s3_endpoint, key="testing", secret="testing")

    def shards(uri: str) -> list[str]:
        return list_shards(InputConfig(uri=f"s3://{bucket}/{uri}", storage_options=storage))

    for pattern in ("a/*", "a/**", "a/**/*.tar", "*/deep/*", "a/?.tar", "a/[12].*", "a*", "a/deep/*/*"):
        globbed = [f"s3://{p}" for p in fs.glob(f"{bucket}/{pattern}") if not fs.isdir(p)]
        assert shards(pattern) == sorted(p for p in globbed if p.lower().endswith((".tar", ".tar.gz"))), pattern
    folder = list_shards(InputConfig(uri=[f"s3://{bucket}/a/", f"s3://{bucket}/b/5.tar"], storage_options=storage))
    assert folder == [f"s3://{bucket}/{k}" for k in ("a/1.tar", "a/2.TAR", "a/deep/3.tar", "a/deep/er/4.tar.gz",
                                                      "b/5.tar")]  # recursive, "_" files left out
    assert folder.skipped == {"txt": 1, "(none)": 1}
    assert filesystem(f"s3://{bucket}/a", storage)[0].dircache == {}  # the listing is not kept
