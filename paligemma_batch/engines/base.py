"""The engine interface: what the pipeline needs from a model runtime. Torch-free, Ray-free."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from paligemma_batch.config import ModelConfig, StorageOptions


@dataclass(frozen=True)
class Request:
    image_index: int  # which image of the batch the prompt is about (the first, with image_indices)
    input_ids: list[int]  # the full prompt: <image>×N per image, <bos>, prompt tokens, "\n"
    image_indices: tuple[int, ...] | None = None  # several images in one prompt (a clip's frames), in order

    @property
    def images(self) -> tuple[int, ...]:
        """The batch images whose tokens the prompt holds, in prompt order."""
        return self.image_indices or (self.image_index,)


@dataclass(frozen=True)
class Generated:
    text: str
    num_input_tokens: int
    num_output_tokens: int
    token_ids: list[int]


class Engine(ABC):
    """Batched greedy generation over (image, prompt) requests; one instance per actor.

    The CPU stage prepares what :func:`paligemma_batch.engines.input_spec` returns (the input size and the
    prompt ids), so an engine receives uint8 pixels at that size and finished token ids.
    """

    @classmethod
    @abstractmethod
    def load(cls, model: ModelConfig, storage: StorageOptions, num_gpus: float) -> Engine:
        """Load the checkpoint of ``model`` onto this process's devices."""

    @property
    @abstractmethod
    def device(self):
        """Where the engine computes (a torch device for torch engines)."""

    @abstractmethod
    def generate(self, pixels: list[np.ndarray], requests: list[Request]) -> list[Generated]:
        """One :class:`Generated` per request, in order; ``pixels`` are uint8 [H, W, 3] at the input size."""
