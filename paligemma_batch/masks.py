"""The PaliGemma VQ-VAE mask decoder (torch); pasting and COCO RLE are in :mod:`paligemma_batch.rle`.

The decoder follows big_vision ``evaluators/proj/paligemma/transfers/segmentation.py``
and loads its checkpoint ``vae-oid.npz``, whose weights are in PyTorch layouts
(Conv2d ``(out, in, kh, kw)``, ConvTranspose2d ``(in, out, kh, kw)``); big_vision
transposes them with ``(2, 3, 1, 0)`` into Flax kernels. Flax's ``ConvTranspose``
with ``transpose_kernel=True``, stride 2 and padding 2 on the dilated input is
exactly torch's ``ConvTranspose2d(kernel_size=4, stride=2, padding=1)``.

Output range: big_vision documents the decoded 64x64 values as "in [-1, 1]", but its
last layer is a plain 1x1 conv (no tanh, no clipping). It resizes the raw values to
the box with PIL bilinear and keeps pixels ``> 0``. We do the same and never clip,
so the decoded values can exceed [-1, 1]; only their sign is used.
"""

from __future__ import annotations

from collections.abc import Mapping

import fsspec
import numpy as np
import torch
from torch import nn

from paligemma_batch.parse import SEG_TOKENS

EMBEDDING_KEY = "_vq_vae._embedding"
_CONV_LAYERS = (0, 12)
RES_BLOCKS = (2, 3)
RES_CONVS = (0, 2, 4)
UPSAMPLE_LAYERS = (4, 6, 8, 10)


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array, np.float32))


def _weight_keys() -> list[str]:
    """Layer names in ``vae-oid.npz`` (each has ``.weight`` and ``.bias``)."""
    names = [f"decoder.{i}" for i in (*_CONV_LAYERS, *UPSAMPLE_LAYERS)]
    names += [f"decoder.{b}.net.{c}" for b in RES_BLOCKS for c in RES_CONVS]
    return [f"{n}.{p}" for n in names for p in ("weight", "bias")]


class _ResBlock(nn.Module):
    """3x3 conv, ReLU, 3x3 conv, ReLU, 1x1 conv, plus the input."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class MaskDecoder(nn.Module):
    """Decodes 16 VQ codes per object into a 64x64 mask logit map (> 0 is inside).

    Layer widths come from the checkpoint shapes, so the real ``vae-oid.npz``
    (codebook dim 512, 128 channels) and narrower trained codecs load the same way.
    The module names reproduce the checkpoint keys (``decoder.N...``).
    """

    def __init__(self, num_codes: int, embedding_dim: int, channels: int, upsample_channels: tuple[int, ...]):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(num_codes, embedding_dim))
        layers: list[nn.Module] = [nn.Conv2d(embedding_dim, channels, 1), nn.ReLU()]
        layers += [_ResBlock(channels) for _ in RES_BLOCKS]
        in_channels = channels
        for out_channels in upsample_channels:
            layers += [nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1), nn.ReLU()]
            in_channels = out_channels
        layers.append(nn.Conv2d(in_channels, 1, 1))
        self.decoder = nn.Sequential(*layers)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> MaskDecoder:
        """Build from ``vae-oid.npz``-style arrays; raises KeyError naming missing keys."""
        missing = [k for k in (EMBEDDING_KEY, *_weight_keys()) if k not in arrays]
        if missing:
            raise KeyError(f"mask decoder arrays lack keys: {missing}")
        model = cls(
            *arrays[EMBEDDING_KEY].shape,
            channels=arrays["decoder.0.weight"].shape[0],
            upsample_channels=tuple(arrays[f"decoder.{i}.weight"].shape[1] for i in UPSAMPLE_LAYERS),
        )
        state = {k.removeprefix("decoder."): _tensor(arrays[k]) for k in _weight_keys()}
        model.decoder.load_state_dict(state)
        with torch.no_grad():
            model.embedding.copy_(_tensor(arrays[EMBEDDING_KEY]))
        return model

    @classmethod
    def from_npz(cls, path_or_uri: str, storage_options: dict | None = None) -> MaskDecoder:
        """Load from a local path or any fsspec URI (``s3://...``)."""
        with fsspec.open(path_or_uri, "rb", **(storage_options or {})) as f, np.load(f) as npz:
            return cls.from_arrays({k: npz[k] for k in npz.files})

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Inverse of :meth:`from_arrays`, with the same key names."""
        arrays = {EMBEDDING_KEY: self.embedding.detach().cpu().numpy().copy()}
        for k, v in self.decoder.state_dict().items():
            arrays[f"decoder.{k}"] = v.detach().cpu().numpy().copy()
        return arrays

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """Decode ``[N, 16]`` codes (0..127) into ``[N, 64, 64]`` float masks in one call."""
        if codes.ndim != 2 or codes.shape[1] != SEG_TOKENS:
            raise ValueError(f"codes must be [N, {SEG_TOKENS}], got {list(codes.shape)}")
        x = self.embedding[codes.to(self.embedding.device)]  # [N, 16, D], row-major 4x4 grid
        x = x.reshape(-1, 4, 4, x.shape[-1]).permute(0, 3, 1, 2)
        return self.decoder(x)[:, 0]
