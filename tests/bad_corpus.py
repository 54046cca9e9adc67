"""A seeded corpus of bad and odd inputs, each named for what it is, with the row the job must give for it.

Image-level cases are samples inside WebDataset tars; shard-level cases are whole tars (malformed, empty,
missing, deleted after listing, truncated, compressed). ``write_corpus`` writes them and returns, for every
``image_id``, the expected outcome: ``"ok"`` with the (width, height) after EXIF orientation, or an error kind.
"""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

RED, GREEN, BLUE, WHITE = (230, 20, 20), (20, 200, 40), (30, 40, 220), (255, 255, 255)
BOMB_SIDE = 30_000  # a PNG header claiming 30000x30000 (900M pixels): past Pillow's own hard stop
MAX_PIXELS = 4_000_000  # the job's preprocess.max_image_pixels in the corpus test
OVER_LIMIT_SIDE = 2_100  # 2100x2100 = 4.41M pixels: over MAX_PIXELS, under Pillow's limits


@dataclass(frozen=True)
class Symlink:
    """A tar member that is a symbolic link (it must never be followed)."""

    target: str


@dataclass(frozen=True)
class Sample:
    """One WebDataset sample: ``key`` + "." + ext for each member, and the outcome its row must have."""

    name: str  # what kind of input this is, self-describing
    key: str
    members: list[tuple[str, bytes | Symlink]]  # (extension, content)
    outcome: str  # "ok" or the error kind
    size: tuple[int, int] | None = None  # (width, height) after EXIF orientation, for "ok"


@dataclass(frozen=True)
class Expected:
    outcome: str
    size: tuple[int, int] | None = None


@dataclass
class Corpus:
    shard_uris: list[str]  # everything input.uri lists (the missing shard included)
    delete_after_listing: str  # exists when listed; delete it before the readers reach it
    expected: dict[str, Expected] = field(default_factory=dict)  # image_id -> outcome
    kinds: list[str] = field(default_factory=list)  # every kind of bad or odd input in the corpus


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def solid(size: tuple[int, int], color, mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, color)


def noise_jpeg(rng: np.random.Generator, width: int, height: int, **params) -> bytes:
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels, "RGB"), "JPEG", quality=90, **params)


# --- images oriented by EXIF -------------------------------------------------------------------------------

ORIENTED_SIZE = (48, 32)  # (width, height) as displayed


def oriented_display() -> np.ndarray:
    """The upright picture: red top-left quarter, green top-right quarter, white bottom half."""
    width, height = ORIENTED_SIZE
    pixels = np.full((height, width, 3), WHITE, np.uint8)
    pixels[: height // 2, : width // 2] = RED
    pixels[: height // 2, width // 2 :] = GREEN
    return pixels


def stored_for_orientation(display: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores for ``display`` under an EXIF orientation, from the EXIF 2.3 table
    (where stored row 0 and column 0 are shown), independent of Pillow's own mapping."""
    d = display
    return {
        1: d,  # row 0 top, column 0 left
        2: d[:, ::-1],  # row 0 top, column 0 right
        3: d[::-1, ::-1],  # row 0 bottom, column 0 right
        4: d[::-1, :],  # row 0 bottom, column 0 left
        5: d.transpose(1, 0, 2),  # row 0 left, column 0 top
        6: d[:, ::-1].transpose(1, 0, 2),  # row 0 right, column 0 top
        7: d[::-1, ::-1].transpose(1, 0, 2),  # row 0 right, column 0 bottom
        8: d[::-1, :].transpose(1, 0, 2),  # row 0 left, column 0 bottom
    }[orientation]


def oriented_jpeg(orientation: int) -> bytes:
    stored = np.ascontiguousarray(stored_for_orientation(oriented_display(), orientation))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(stored, "RGB"), "JPEG", quality=95, exif=exif.tobytes())


# --- hand-made PNGs ------------------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG from filtered scanlines (``rows`` already holds each row's filter byte)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows, 9))
            + png_chunk(b"IEND", b""))


def png_16bit_rgb(width: int, height: int, rgb16: tuple[int, int, int]) -> bytes:
    row = b"\x00" + struct.pack(">HHH", *rgb16) * width
    return raw_png(width, height, 16, 2, row * height)


def png_bomb_header(side: int) -> bytes:
    """A valid PNG header claiming ``side`` x ``side`` pixels, followed by almost no data."""
    return raw_png(side, side, 1, 0, b"\x00" * 8)[:-12] + png_chunk(b"IEND", b"")


def png_16bit_gray(values: np.ndarray) -> bytes:
    return encode(Image.fromarray(values.astype(np.uint16)), "PNG")


def palette_png_with_transparency() -> bytes:
    """Left half palette index 0 (black, fully transparent via tRNS), right half index 1 (red)."""
    img = Image.new("P", (40, 20), 0)
    img.putpalette([0, 0, 0, *RED] + [0] * 762)
    img.paste(1, (20, 0, 40, 20))
    return encode(img, "PNG", transparency=0)


def animated_gif() -> bytes:
    """Two frames: blue, then yellow; the first frame is the image."""
    frames = [solid((30, 20), BLUE), solid((30, 20), (240, 220, 20))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def cmyk_jpeg() -> bytes:
    return encode(solid((32, 24), (0, 255, 255, 0), "CMYK"), "JPEG", quality=95)  # pure red in CMYK


def corrupt_exif_jpeg() -> bytes:
    """A good JPEG whose APP1 'Exif' segment holds garbage instead of a TIFF header."""
    good = encode(solid((24, 16), BLUE), "JPEG")
    junk = b"Exif\x00\x00" + b"\xde\xad\xbe\xef" * 8
    return good[:2] + b"\xff\xe1" + struct.pack(">H", len(junk) + 2) + junk + good[2:]


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n%%EOF\n"


def image_samples(rng: np.random.Generator) -> list[Sample]:
    """One sample per kind of odd image content."""
    good_jpeg = noise_jpeg(rng, 40, 30)
    good_png = encode(solid((33, 17), GREEN), "PNG")
    noise_png = encode(Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)), "PNG")
    return [
        Sample("control: plain RGB JPEG", "control-rgb-jpeg", [("jpg", good_jpeg)], "ok", (40, 30)),
        Sample("truncated JPEG", "truncated-jpeg", [("jpg", good_jpeg[: len(good_jpeg) // 2])], "decode"),
        Sample("zero-byte file", "zero-byte", [("jpg", b"")], "empty"),
        Sample("text file named .jpg", "text-named-jpg", [("jpg", b"this is a text file, not a JPEG\n")],
               "decode"),
        Sample("HTML error page named .png", "html-named-png",
               [("png", b"<html><body>503 Service Unavailable</body></html>")], "decode"),
        Sample("PNG bytes named .jpg", "png-bytes-named-jpg", [("jpg", good_png)], "ok", (33, 17)),
        Sample("PostScript named .jpg (a format never decoded)", "postscript-named-jpg", [("jpg", EPS)], "decode"),
        Sample("CMYK JPEG", "cmyk-jpeg", [("jpg", cmyk_jpeg())], "ok", (32, 24)),
        Sample("progressive JPEG", "progressive-jpeg", [("jpg", noise_jpeg(rng, 50, 20, progressive=True))],
               "ok", (50, 20)),
        Sample("16-bit grayscale PNG", "png-16bit-gray",
               [("png", png_16bit_gray(np.tile(np.linspace(0, 65535, 30), (10, 1))))], "ok", (30, 10)),
        Sample("16-bit grayscale PNG, nearly black", "png-16bit-gray-dark",
               [("png", png_16bit_gray(np.full((10, 12), 200)))], "ok", (12, 10)),
        Sample("16-bit RGB PNG", "png-16bit-rgb", [("png", png_16bit_rgb(14, 9, (65535, 0, 32896)))], "ok",
               (14, 9)),
        Sample("palette PNG with transparency", "palette-png-transparent",
               [("png", palette_png_with_transparency())], "ok", (40, 20)),
        Sample("RGBA PNG", "rgba-png", [("png", encode(solid((20, 20), (*RED, 128), "RGBA"), "PNG"))], "ok",
               (20, 20)),
        Sample("grayscale + alpha PNG", "la-png", [("png", encode(solid((15, 25), (90, 200), "LA"), "PNG"))],
               "ok", (15, 25)),
        Sample("1-bit PNG", "bilevel-png", [("png", encode(solid((16, 8), 1, "1"), "PNG"))], "ok", (16, 8)),
        Sample("animated GIF", "animated-gif", [("gif", animated_gif())], "ok", (30, 20)),
        Sample("WebP", "webp", [("webp", encode(solid((21, 13), BLUE), "WEBP"))], "ok", (21, 13)),
        Sample("BMP", "bmp", [("bmp", encode(solid((9, 7), GREEN), "BMP"))], "ok", (9, 7)),
        Sample("TIFF", "tiff", [("tiff", encode(solid((11, 6), RED), "TIFF"))], "ok", (11, 6)),
        Sample("float32 TIFF in [0, 1]", "tiff-float32",
               [("tif", encode(Image.fromarray(np.full((6, 10), 0.5, np.float32), "F"), "TIFF"))], "ok", (10, 6)),
        Sample("corrupt EXIF block", "corrupt-exif-jpeg", [("jpg", corrupt_exif_jpeg())], "ok", (24, 16)),
        Sample("1x1 image", "one-by-one", [("png", encode(solid((1, 1), RED), "PNG"))], "ok", (1, 1)),
        Sample("20000x20 image", "wide-20000x20", [("png", encode(solid((20_000, 20), GREEN), "PNG"))], "ok",
               (20_000, 20)),
        Sample("20x20000 JPEG", "tall-20x20000", [("jpg", encode(solid((20, 20_000), BLUE), "JPEG"))], "ok",
               (20, 20_000)),
        Sample("large JPEG decoded in draft mode", "large-jpeg-2000x1500",
               [("jpg", noise_jpeg(rng, 2000, 1500))], "ok", (2000, 1500)),
        Sample("decompression bomb (header claims 30000x30000)", "decompression-bomb",
               [("png", png_bomb_header(BOMB_SIDE))], "too_large"),
        Sample("over preprocess.max_image_pixels", "over-max-pixels",
               [("png", encode(solid((OVER_LIMIT_SIDE, OVER_LIMIT_SIDE), 0, "L"), "PNG"))], "too_large"),
        Sample("truncated PNG", "truncated-png", [("png", noise_png[: len(noise_png) // 2])], "decode"),
    ]


def orientation_samples() -> list[Sample]:
    return [Sample(f"EXIF orientation {o}", f"exif-orientation-{o}", [("jpg", oriented_jpeg(o))], "ok",
                   ORIENTED_SIZE) for o in range(1, 9)]


def key_samples(rng: np.random.Generator) -> list[Sample]:
    """Odd keys and member layouts: unicode, spaces, duplicates, path escapes, links, no image."""
    jpeg = noise_jpeg(rng, 20, 10)
    return [
        Sample("unicode key", "ünïcödé-猫-ключ", [("jpg", jpeg)], "ok", (20, 10)),
        Sample("key with spaces in a nested folder", "a folder/key with  spaces ", [("jpg", jpeg)], "ok",
               (20, 10)),
        Sample("duplicate key within a shard (first)", "duplicate-key", [("jpg", jpeg)], "ok", (20, 10)),
        Sample("sample with sidecars between the duplicates", "between-duplicates",
               [("txt", b"a caption"), ("json", b'{"question": "what?"}'), ("jpg", jpeg)], "ok", (20, 10)),
        Sample("duplicate key within a shard (second)", "duplicate-key", [("jpg", jpeg)], "ok", (20, 10)),
        Sample("uppercase extension", "uppercase-ext", [("JPG", jpeg)], "ok", (20, 10)),
        Sample("sample without an image member", "no-image-member", [("txt", b"caption only"), ("json", b"{}")],
               "no_image"),
        Sample("member name with ../", "../../escape-dotdot", [("jpg", jpeg)], "ok", (20, 10)),
        Sample("absolute member name", "/etc/escape-absolute", [("jpg", jpeg)], "ok", (20, 10)),
        Sample("image member that is a symlink", "symlink-image", [("jpg", Symlink("/etc/passwd"))], "link"),
        Sample("300-character key (PAX header)", "long-key-" + "x" * 291, [("jpg", jpeg)], "ok", (20, 10)),
    ]


def tar_bytes(samples: list[Sample]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for sample in samples:
            for ext, content in sample.members:
                info = tarfile.TarInfo(f"{sample.key}.{ext}")
                info.mtime = 1_700_000_000
                if isinstance(content, Symlink):
                    info.type, info.linkname = tarfile.SYMTYPE, content.target
                    tar.addfile(info)
                else:
                    info.size = len(content)
                    tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def sample_ids(uri: str, samples: list[Sample]) -> dict[str, Expected]:
    """The documented keying: shard URI + "::" + key, and "#n" for the n-th repeat of a key in a shard."""
    seen: dict[str, int] = {}
    out = {}
    for sample in samples:
        seen[sample.key] = seen.get(sample.key, 0) + 1
        suffix = f"#{seen[sample.key]}" if seen[sample.key] > 1 else ""
        out[f"{uri}::{sample.key}{suffix}"] = Expected(sample.outcome, sample.size)
    return out


def write_corpus(folder: Path, seed: int = 5) -> Corpus:
    """Write every case under ``folder`` and return what the job must make of it."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = Corpus(shard_uris=[str(folder / "*.tar"), str(folder / "missing-shard.tar")],
                    delete_after_listing=str(folder / "deleted-after-listing.tar"))

    for name, samples in [("odd-images.tar", image_samples(rng)), ("exif-orientations.tar", orientation_samples()),
                          ("odd-keys.tar", key_samples(rng))]:
        (folder / name).write_bytes(tar_bytes(samples))
        corpus.expected.update(sample_ids(str(folder / name), samples))
        corpus.kinds += [s.name for s in samples]

    good = [Sample(f"good {i}", f"good-{i}", [("jpg", noise_jpeg(rng, 30, 20))], "ok", (30, 20)) for i in range(3)]
    whole = tar_bytes(good)
    cut = whole.index(good[2].members[0][1]) + 100  # in the middle of the third sample's image
    shard_cases = [
        ("malformed tar (random bytes)", "malformed-random-bytes.tar", rng.bytes(4096), "bad_shard", []),
        ("empty shard (zero bytes)", "empty-zero-bytes.tar", b"", "empty_shard", []),
        ("empty shard (a tar with no members)", "empty-no-members.tar", b"\0" * 10240, "empty_shard", []),
        ("tar truncated in the middle of a member", "truncated-mid-member.tar", whole[:cut], "bad_shard", good[:2]),
        ("gzip-compressed tar", "gzip-compressed.tar", gzip.compress(whole, mtime=0), None, good),
        ("shard deleted after listing", "deleted-after-listing.tar", whole, "missing_shard", []),
    ]
    for kind, name, data, shard_outcome, rows in shard_cases:
        uri = str(folder / name)
        (folder / name).write_bytes(data)
        corpus.expected.update(sample_ids(uri, rows))
        if shard_outcome:
            corpus.expected[uri] = Expected(shard_outcome)
        corpus.kinds.append(kind)
    corpus.expected[str(folder / "missing-shard.tar")] = Expected("missing_shard")
    corpus.kinds.append("missing shard (listed by name, never existed)")
    return corpus
