"""Tests for paligemma_batch.masks: VQ-VAE decoder, mask pasting, COCO RLE."""


import numpy as np
import pytest
import torch
from pycocotools import mask as coco_mask

from paligemma_batch.masks import MaskDecoder
from paligemma_batch.rle import decode_rle, encode_rle, paste_mask
from paligemma_batch.fixtures.vae import random_vae_arrays, save_vae_npz

# Shapes of the real gs://big_vision/paligemma/vae-oid.npz.
REAL_SHAPES = {
    "_vq_vae._embedding": (128, 512),
    "decoder.0.weight": (128, 512, 1, 1),
    "decoder.0.bias": (128,),
    **{f"decoder.{b}.net.{c}.weight": (128, 128, k, k) for b in (2, 3) for c, k in ((0, 3), (2, 3), (4, 1))},
    **{f"decoder.{b}.net.{c}.bias": (128,) for b in (2, 3) for c in (0, 2, 4)},
    "decoder.4.weight": (128, 128, 4, 4),
    "decoder.4.bias": (128,),
    "decoder.6.weight": (128, 64, 4, 4),
    "decoder.6.bias": (64,),
    "decoder.8.weight": (64, 32, 4, 4),
    "decoder.8.bias": (32,),
    "decoder.10.weight": (32, 16, 4, 4),
    "decoder.10.bias": (16,),
    "decoder.12.weight": (1, 16, 1, 1),
    "decoder.12.bias": (1,),
}


# --- Reference decoder in numpy, NHWC, following big_vision's Flax code. ---


def _flax_kernel(torch_weight):
    """big_vision `_get_params.transp`: PyTorch weight -> Flax kernel."""
    return np.transpose(torch_weight, (2, 3, 1, 0)).astype(np.float64)


def _correlate(x, kernel_hwio, pad):
    """Flax/lax conv (cross-correlation), stride 1, symmetric zero padding."""
    kh, kw = kernel_hwio.shape[:2]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h, w = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    out = np.zeros((x.shape[0], h, w, kernel_hwio.shape[3]))
    for i in range(kh):
        for j in range(kw):
            out += xp[:, i : i + h, j : j + w, :] @ kernel_hwio[i, j]
    return out


def _conv(x, arrays, name, pad):
    return _correlate(x, _flax_kernel(arrays[name + ".weight"]), pad) + arrays[name + ".bias"]


def _conv_transpose(x, arrays, name):
    """nn.ConvTranspose(kernel 4, strides 2, padding 2, transpose_kernel=True) as lax does it.

    transpose_kernel flips the spatial axes and swaps in/out; the input is dilated by
    the stride and padded by 2, then cross-correlated.
    """
    kernel = _flax_kernel(arrays[name + ".weight"])[::-1, ::-1].swapaxes(2, 3)
    n, h, w, c = x.shape
    dilated = np.zeros((n, 2 * h - 1, 2 * w - 1, c))
    dilated[:, ::2, ::2] = x
    return _correlate(dilated, kernel, pad=2) + arrays[name + ".bias"]


def relu(v):
    return np.maximum(v, 0)


def numpy_decode(arrays, codes):
    emb = arrays["_vq_vae._embedding"].astype(np.float64)
    x = emb[codes.reshape(-1)].reshape(codes.shape[0], 4, 4, emb.shape[1])
    x = relu(_conv(x, arrays, "decoder.0", pad=0))
    for block in ("decoder.2.net", "decoder.3.net"):
        y = relu(_conv(x, arrays, block + ".0", pad=1))
        y = relu(_conv(y, arrays, block + ".2", pad=1))
        x = x + _conv(y, arrays, block + ".4", pad=0)
    for layer in ("decoder.4", "decoder.6", "decoder.8", "decoder.10"):
        x = relu(_conv_transpose(x, arrays, layer))
    return _conv(x, arrays, "decoder.12", pad=0)[..., 0]


# --- Decoder ---


@pytest.fixture(scope="module")
def small_arrays():
    return random_vae_arrays(seed=3, embedding_dim=16, channels=32)


def test_decoder_matches_numpy_reference(small_arrays):
    codes = np.random.default_rng(0).integers(0, 128, size=(3, 16))
    codes[0] = np.arange(16) * 8  # distinct codes: catches a transposed 4x4 gather
    with torch.no_grad():
        got = MaskDecoder.from_arrays(small_arrays)(torch.from_numpy(codes)).numpy()
    want = numpy_decode(small_arrays, codes)
    assert got.shape == (3, 64, 64)
    assert want.std() > 0.05  # not a degenerate constant output
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_random_arrays_have_real_checkpoint_shapes():
    arrays = random_vae_arrays()
    assert {k: v.shape for k, v in arrays.items()} == REAL_SHAPES
    assert all(v.dtype == np.float32 for v in arrays.values())


def test_real_shape_decoder_batches():
    decoder = MaskDecoder.from_arrays(random_vae_arrays(seed=1))
    codes = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        batch = decoder(codes)
        single = decoder(codes[2:3])
    assert batch.shape == (5, 64, 64) and batch.dtype == torch.float32
    torch.testing.assert_close(batch[2:3], single, atol=1e-5, rtol=1e-5)


def test_bad_codes_shape_raises(small_arrays):
    with pytest.raises(ValueError, match="16"):
        MaskDecoder.from_arrays(small_arrays)(torch.zeros(2, 15, dtype=torch.long))


def test_missing_key_raises(small_arrays):
    arrays = dict(small_arrays)
    del arrays["decoder.6.bias"]
    with pytest.raises(KeyError, match="decoder.6.bias"):
        MaskDecoder.from_arrays(arrays)


def test_to_arrays_round_trip(small_arrays):
    back = MaskDecoder.from_arrays(small_arrays).to_arrays()
    assert back.keys() == small_arrays.keys()
    for key, value in small_arrays.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_from_npz_loads_saved_file(small_arrays, tmp_path, where):
    uri = str(tmp_path / "vae-small.npz") if where == "local" else f"memory://{tmp_path.name}/vae-small.npz"
    save_vae_npz(small_arrays, uri)
    codes = np.random.default_rng(1).integers(0, 128, size=(2, 16))
    with torch.no_grad():
        got = MaskDecoder.from_npz(uri)(torch.from_numpy(codes)).numpy()
    np.testing.assert_allclose(got, numpy_decode(small_arrays, codes), atol=1e-5, rtol=0)


# --- RLE ---


@pytest.mark.parametrize("shape", [(300, 500), (7, 3), (1, 1)])
def test_rle_round_trip(shape):
    mask = np.random.default_rng(sum(shape)).random(shape) > 0.6
    rle = encode_rle(mask)
    assert rle["size"] == list(shape) and isinstance(rle["counts"], str)
    decoded = decode_rle(rle)
    assert decoded.dtype == bool
    np.testing.assert_array_equal(decoded, mask)
    assert coco_mask.area({"size": rle["size"], "counts": rle["counts"].encode()}) == mask.sum()


def test_rle_empty_and_full():
    for mask in (np.zeros((4, 6), bool), np.ones((4, 6), bool)):
        np.testing.assert_array_equal(decode_rle(encode_rle(mask)), mask)


# --- Pasting into a non-square original (width 500, height 300) ---

W, H = 500, 300
BOX = (100.4, 50.6, 300.2, 200.5)  # rounds to x 100..300, y 51..201 (end-exclusive)


def box_region():
    region = np.zeros((H, W), bool)
    region[51:201, 100:300] = True
    return region


def test_full_mask_fills_box_exactly():
    pasted = paste_mask(np.ones((64, 64), np.float32), BOX, W, H)
    assert pasted.shape == (H, W) and pasted.dtype == bool
    np.testing.assert_array_equal(pasted, box_region())


def test_negative_mask_is_empty():
    assert not paste_mask(-np.ones((64, 64), np.float32), BOX, W, H).any()


def test_random_mask_stays_inside_box():
    mask64 = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    pasted = paste_mask(mask64, BOX, W, H)
    assert pasted.any()
    assert not (pasted & ~box_region()).any()


def test_paste_orientation():
    """Left half positive -> left half of the box (x), top half positive -> top half (y)."""
    left = np.where(np.arange(64)[None, :] < 32, 1.0, -1.0) * np.ones((64, 64))
    pasted = paste_mask(left.astype(np.float32), BOX, W, H)
    assert pasted[51:201, 100:195].all() and not pasted[:, 205:].any()
    top = left.T
    pasted = paste_mask(top.astype(np.float32), BOX, W, H)
    assert pasted[51:121, 100:300].all() and not pasted[131:].any()


def test_box_partly_outside_image_is_cropped():
    pasted = paste_mask(np.ones((64, 64), np.float32), (450.0, -20.0, 560.0, 40.0), W, H)
    expected = np.zeros((H, W), bool)
    expected[0:40, 450:500] = True
    np.testing.assert_array_equal(pasted, expected)


def test_degenerate_box_is_empty():
    assert not paste_mask(np.ones((64, 64), np.float32), (10.0, 10.0, 10.2, 50.0), W, H).any()
