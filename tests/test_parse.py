"""Tests for paligemma_batch.parse: PaliGemma loc/seg output parsing."""


import pytest

from paligemma_batch.parse import LOC_BINS, ParsedObject, parse_objects


def loc(*bins: int) -> str:
    return "".join(f"<loc{b:04d}>" for b in bins)


def seg(*codes: int) -> str:
    return "".join(f"<seg{c:03d}>" for c in codes)


SEG16 = tuple(range(0, 128, 8))


def test_loc_bins_is_1024():
    assert LOC_BINS == 1024


def test_big_vision_detect_output():
    result = parse_objects("<loc0123><loc0456><loc0789><loc1000> cat ; <loc0010><loc0020><loc0400><loc0300> dog")
    assert result.invalid == 0 and result.reasons == []
    assert [o.label for o in result.objects] == ["cat", "dog"]
    cat, dog = result.objects
    assert cat.loc_tokens == (123, 456, 789, 1000)
    assert dog.loc_tokens == (10, 20, 400, 300)
    assert cat.seg_tokens is None and dog.seg_tokens is None
    assert cat.box_norm == pytest.approx((456 / 1024, 123 / 1024, 1000 / 1024, 789 / 1024))


def test_segment_output():
    codes = (5, 127, 0, 64, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)
    result = parse_objects(loc(100, 200, 300, 400) + seg(*codes) + " car")
    assert result.invalid == 0
    (obj,) = result.objects
    assert obj == ParsedObject(label="car", loc_tokens=(100, 200, 300, 400), seg_tokens=codes)


def test_segment_and_detect_mixed():
    text = f"{loc(1, 2, 3, 4)}{seg(*SEG16)} cat ; {loc(10, 20, 30, 40)} dog ; {loc(5, 6, 7, 8)}{seg(*SEG16)} bird"
    result = parse_objects(text)
    assert result.invalid == 0
    assert [(o.label, o.seg_tokens) for o in result.objects] == [("cat", SEG16), ("dog", None), ("bird", SEG16)]


def test_leading_free_text_ignored():
    result = parse_objects("Sure! here is what I found: " + loc(1, 2, 3, 4) + " cat")
    assert result.invalid == 0
    assert [o.label for o in result.objects] == ["cat"]


def test_free_text_without_tokens_not_counted():
    result = parse_objects("no objects here ; <seg001> really none")
    assert result.objects == [] and result.invalid == 0 and result.reasons == []


def test_empty_text():
    result = parse_objects("")
    assert result.objects == [] and result.invalid == 0 and result.reasons == []


def test_missing_label():
    result = parse_objects(loc(1, 2, 3, 4) + " ; " + loc(5, 6, 7, 8) + seg(*SEG16))
    assert [o.label for o in result.objects] == ["", ""]
    assert result.invalid == 0


@pytest.mark.parametrize("n", [3, 5])
def test_wrong_loc_count_invalid(n):
    text = loc(*range(10, 10 + 10 * n, 10)) + " cat ; " + loc(1, 2, 3, 4) + " dog"
    result = parse_objects(text)
    assert [o.label for o in result.objects] == ["dog"]
    assert result.invalid == 1
    assert result.reasons == [f"{n} loc tokens"]


def test_trailing_separator():
    result = parse_objects(loc(1, 2, 3, 4) + " cat ;")
    assert result.invalid == 0
    assert [o.label for o in result.objects] == ["cat"]


@pytest.mark.parametrize(
    "label", ["person's hat", "café au lait", "猫", "red  traffic light", "Ünïcødé 🐈"]
)
def test_labels_kept_verbatim(label):
    result = parse_objects(loc(1, 2, 3, 4) + f"   {label} \t ; ")
    assert [o.label for o in result.objects] == [label]


@pytest.mark.parametrize(
    "tokens, reason",
    [
        ("<loc0001><loc0002><loc1024><loc0004>", "loc out of range"),
        ("<loc0001><loc0002><loc99999><loc0004>", "loc out of range"),
        (loc(300, 2, 300, 4), "ymax<=ymin"),
        (loc(300, 2, 200, 4), "ymax<=ymin"),
        (loc(1, 40, 3, 40), "xmax<=xmin"),
        (loc(1, 2, 3, 4) + seg(*SEG16[:15]), "15 seg tokens"),
        (loc(1, 2, 3, 4) + seg(*SEG16, 0), "17 seg tokens"),
        (loc(1, 2, 3, 4) + seg(*SEG16[:15], 128), "seg out of range"),
    ],
)
def test_invalid_objects_counted_with_reason(tokens, reason):
    result = parse_objects(f"{loc(1, 2, 3, 4)} ok ; {tokens} bad ; {loc(5, 6, 7, 8)} fine")
    assert [o.label for o in result.objects] == ["ok", "fine"]
    assert result.invalid == 1
    assert result.reasons == [reason]


def test_edge_bins_valid():
    (obj,) = parse_objects(loc(0, 0, 1023, 1023) + " all").objects
    assert obj.box_norm == (0.0, 0.0, 1023 / 1024, 1023 / 1024)


def test_objects_without_separator_split_at_loc_tokens():
    result = parse_objects(loc(1, 2, 3, 4) + " cat " + loc(5, 6, 7, 8) + " dog")
    assert [(o.label, o.loc_tokens) for o in result.objects] == [("cat", (1, 2, 3, 4)), ("dog", (5, 6, 7, 8))]


def test_box_pixels_non_square():
    (obj,) = parse_objects(loc(256, 128, 768, 512) + " cat").objects  # ymin xmin ymax xmax
    x0, y0, x1, y1 = obj.box_pixels(width=500, height=300)
    assert (x0, x1) == pytest.approx((128 / 1024 * 500, 512 / 1024 * 500))
    assert (y0, y1) == pytest.approx((256 / 1024 * 300, 768 / 1024 * 300))




@pytest.mark.parametrize(
    "tokens, reason",
    [
        ("<loc0001><loc0002><loc00100><loc0004>", "malformed loc token"),  # 5 digits, in range: not a loc token
        ("<loc001><loc0002><loc0100><loc0004>", "malformed loc token"),
        (loc(1, 2, 3, 4) + seg(*SEG16[:15]) + "<seg0001>", "malformed seg token"),
    ],
)
def test_loc_tokens_have_exactly_4_digits_and_seg_tokens_exactly_3(tokens, reason):
    result = parse_objects(f"{loc(1, 2, 3, 4)} ok ; {tokens} bad")
    assert [o.label for o in result.objects] == ["ok"] and result.reasons == [reason]


def test_in_a_segment_task_an_object_without_16_seg_tokens_is_invalid_but_kept_as_a_detection():
    text = f"{loc(1, 2, 3, 4)}{seg(*SEG16)} full ; {loc(5, 6, 7, 8)} bare ; {loc(9, 10, 11, 12)}{seg(*SEG16[:15])} short"
    detect = parse_objects(text)
    assert [o.label for o in detect.objects] == ["full", "bare"] and detect.reasons == ["15 seg tokens"]
    result = parse_objects(text, segment=True)
    assert [(o.label, o.seg_tokens is not None) for o in result.objects] == [
        ("full", True), ("bare", False), ("short", False)]
    assert result.invalid == 2 and result.reasons == ["no seg tokens", "15 seg tokens"]


def test_no_input_of_any_length_raises():
    import random

    rng = random.Random(20261201)
    pieces = ["<loc", "<seg", ">", "<loc0001>", "<seg127>", ";", " ", "cat", "0", "9" * 5000, "<loc" + "1" * 5000 + ">",
              "<seg" + "0" * 4000 + "7>", "\n", "<eos>", "<", "é", "<loc1023>", "<seg000>"]
    for n in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 60)))
        for segment in (False, True):
            result = parse_objects(text, segment)
            assert result.invalid == len(result.reasons)
    huge = loc(1, 2, 3, 4) + seg(*SEG16) + " x ; " * 200_000
    assert len(parse_objects(huge, segment=True).objects) == 1


def test_non_ascii_digits_are_not_token_digits():
    result = parse_objects("<loc٠٠٠١><loc٠٠٠٢><loc٠٠٠٣><loc٠٠٠٤> cat")  # Arabic-Indic digits: plain text
    assert result.objects == [] and result.invalid == 0
