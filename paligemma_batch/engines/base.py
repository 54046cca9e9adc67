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
    max_new_tokens: int | None = None  # this request's generation limit (its task's); None: the engine's
    kind: str = ""  # requests of one kind (a task) have outputs of similar length and are generated together

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


def sub_batches(requests: list[Request], max_rows: int | None = None) -> list[list[int]]:
    """Request positions in sub-batches of one kind and limit each, in order of first appearance, at most
    ``max_rows`` each: a batch never runs a short answer for as long as a mask, and padding stays per kind."""
    groups: dict[tuple[str, int | None], list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault((r.kind, r.max_new_tokens), []).append(i)
    step = max_rows or len(requests) or 1
    return [group[k:k + step] for group in groups.values() for k in range(0, len(group), step)]


def rows_that_fit(free_bytes: int, bytes_per_row: float, headroom: float = 0.85, most: int = 1024) -> int:
    """Requests per generate call that ``headroom`` of ``free_bytes`` holds at ``bytes_per_row`` each (1 to ``most``)."""
    return max(1, min(most, int(free_bytes * headroom // max(bytes_per_row, 1))))


class Engine(ABC):
    """Batched greedy generation over (image, prompt) requests; one instance per actor.

    The CPU stage prepares what :func:`paligemma_batch.engines.input_spec` returns (the input size and the
    prompt ids), so an engine receives uint8 pixels at that size and finished token ids. It generates each
    kind of request in its own :func:`sub_batches`, of at most ``max_rows`` requests.
    """

    max_rows: int | None = None  # most requests (and images) per model call; None: a whole batch at once

    @classmethod
    @abstractmethod
    def load(cls, model: ModelConfig, storage: StorageOptions, num_gpus: float) -> Engine:
        """Load the checkpoint of ``model`` onto this process's devices."""

    @property
    @abstractmethod
    def device(self):
        """Where the engine computes (a torch device for torch engines)."""

    def probe_max_rows(self, prefix_tokens: int, new_tokens: int) -> int | None:
        """How many requests of ``prefix_tokens`` prompt and ``new_tokens`` output fit the device's free memory
        in one call (``inference.batch_size: auto``); None where the engine has no memory probe."""
        return None

    @abstractmethod
    def generate(self, pixels: list[np.ndarray], requests: list[Request]) -> list[Generated]:
        """One :class:`Generated` per request, in order; ``pixels`` are uint8 [H, W, 3] at the input size."""
