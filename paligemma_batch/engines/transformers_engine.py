"""The transformers engine: batched PaliGemma generation, one batch of (pixels, prompt tokens) → text and counts.

Greedy decoding with left padding, the vision tower run once per image however many prompts share it, and
only the new tokens decoded (``<loc>``/``<seg>`` tokens are kept in the text). Knows nothing of Ray or I/O.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from paligemma_batch.config import ModelConfig, StorageOptions
from paligemma_batch.engines.base import Engine, Generated, Request, rows_that_fit, sub_batches


def prompt_ids(processor, prompt: str) -> list[int]:
    """The token ids ``PaliGemmaProcessor`` builds for one image and one prompt."""
    tokenizer = processor.tokenizer
    text_ids = tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"]
    return [processor.image_token_id] * processor.image_seq_length + [tokenizer.bos_token_id] + text_ids


def model_input_size(processor) -> tuple[int, int]:
    size = processor.image_processor.size
    return int(size["height"]), int(size["width"])


def left_pad(sequences: list[list[int]], pad_id: int, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists → left-padded ``input_ids`` and ``attention_mask`` (greedy output then matches batch size 1),
    the width rounded up to a ``multiple``."""
    width = -(-max(len(s) for s in sequences) // multiple) * multiple
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention[row, width - len(ids) :] = 1
    return input_ids, attention


# The static cache's shapes: rows rounded up to a multiple of 8 (repeats of the last, dropped after) and prompt
# width to a multiple of 64 (left padding), so batches of other sizes and per-image questions reuse a compiled step.
STATIC_ROWS = 8
STATIC_WIDTH = 64


class TransformersEngine(Engine):
    """Wraps a loaded transformers model and its processor for batched greedy generation.

    ``cache_implementation`` is passed to ``generate`` ("static" also compiles the decode step on GPU);
    :meth:`load` picks "static" on CUDA and the dynamic cache elsewhere.
    """

    def __init__(self, model, processor, max_new_tokens: int, min_new_tokens: int | None = None,
                 cache_implementation: str | None = None, max_rows: int | None = None):
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.cache_implementation = cache_implementation
        self.max_rows = max_rows
        self.pad_id = processor.tokenizer.pad_token_id
        self.eos_id = processor.tokenizer.eos_token_id
        ip = processor.image_processor
        self._device = model.get_input_embeddings().weight.device
        self._rescale = torch.tensor(ip.rescale_factor, dtype=torch.float32, device=self._device)
        self._mean = torch.tensor(ip.image_mean, dtype=torch.float32, device=self._device).view(1, 3, 1, 1)
        self._std = torch.tensor(ip.image_std, dtype=torch.float32, device=self._device).view(1, 3, 1, 1)
        self.pixel_dtype = model.model.vision_tower.embeddings.patch_embedding.weight.dtype

    @classmethod
    def load(cls, model: ModelConfig, storage: StorageOptions, num_gpus: float) -> TransformersEngine:
        from paligemma_batch.model import load_model, load_processor

        processor = load_processor(model, storage)
        loaded = load_model(model, storage, num_gpus)
        on_cuda = loaded.get_input_embeddings().weight.device.type == "cuda"
        return cls(loaded, processor, model.max_new_tokens, cache_implementation="static" if on_cuda else None)

    @property
    def device(self) -> torch.device:
        return self._device

    def pixel_values(self, pixels: list[np.ndarray]) -> torch.Tensor:
        """uint8 [H, W, 3] images → normalized ``pixel_values`` in the vision tower's dtype and device.

        The batch travels as uint8 (a quarter of float32's bytes) and is normalized where the model runs, with
        the same float32 operations as :func:`paligemma_batch.images.normalize`.
        """
        batch = torch.from_numpy(np.stack(pixels))
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        x = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).to(torch.float32) * self._rescale
        return ((x - self._mean) / self._std).to(self.pixel_dtype).contiguous()

    @torch.inference_mode()
    def image_features(self, pixels: list[np.ndarray]) -> torch.Tensor:
        """One vision-tower + projector pass per image, ``max_rows`` images at a time: [images, image tokens,
        text hidden size]."""
        step = self.max_rows or len(pixels)
        return torch.cat([self.model.model.get_image_features(self.pixel_values(pixels[k:k + step])).pooler_output
                          for k in range(0, len(pixels), step)])

    @torch.inference_mode()
    def generate(self, pixels: list[np.ndarray], requests: list[Request]) -> list[Generated]:
        """Greedy generation for every request; the vision tower runs once per image, not once per request."""
        if not requests:
            return []
        return self.generate_from_features(self.image_features(pixels), requests)

    @torch.inference_mode()
    def generate_from_features(self, features: torch.Tensor, requests: list[Request]) -> list[Generated]:
        """Greedy generation on precomputed :meth:`image_features` (left unchanged), one call per sub-batch:
        requests of one kind and limit together (:func:`sub_batches`), so each call stops at its own length."""
        results: list[Generated | None] = [None] * len(requests)
        for positions in sub_batches(requests, self.max_rows):
            batch = [requests[i] for i in positions]
            limit = batch[0].max_new_tokens or self.max_new_tokens
            forced = min(self.min_new_tokens, limit) if self.min_new_tokens else None
            for i, generated in zip(positions, self._generate(features, batch, limit, forced)):
                results[i] = generated
        return results

    def _generate(self, features: torch.Tensor, requests: list[Request], max_new_tokens: int,
                  min_new_tokens: int | None) -> list[Generated]:
        rows = list(requests)
        static = self.cache_implementation == "static"
        if static:  # few shapes, so the compiled decode step is reused rather than compiled again
            rows += [rows[-1]] * (-len(rows) % STATIC_ROWS)
        # A prompt over several images (a clip) takes their features one after another, in its own order.
        index = torch.tensor([i for r in rows for i in r.images], device=features.device)
        encoded = BaseModelOutputWithPooling(pooler_output=features.index_select(0, index))
        input_ids, attention = left_pad([r.input_ids for r in rows], self.pad_id, STATIC_WIDTH if static else 1)
        width = input_ids.shape[1]
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            token_type_ids=torch.zeros_like(input_ids).to(self.device),
            mm_encoder_outputs={"image": encoded},
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            cache_implementation=self.cache_implementation,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
        )
        new_tokens = out[:, width:].tolist()
        results = []
        for r, tokens in zip(requests, new_tokens):
            if self.eos_id in tokens:
                tokens = tokens[: tokens.index(self.eos_id) + 1]
            text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            results.append(Generated(text, len(r.input_ids), len(tokens), tokens))
        return results

    @torch.inference_mode()
    def probe_max_rows(self, prefix_tokens: int, new_tokens: int, trial_rows: int = 8) -> int | None:
        """On CUDA: the peak memory per request of a :meth:`trial_call` against the free memory. None elsewhere."""
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self.trial_call(prefix_tokens, new_tokens, trial_rows)
        per_row = (torch.cuda.max_memory_allocated(self.device) - before) / trial_rows
        free, _ = torch.cuda.mem_get_info(self.device)
        return rows_that_fit(free, per_row)

    @torch.inference_mode()
    def trial_call(self, prefix_tokens: int, new_tokens: int, rows: int) -> list[Generated]:
        """``rows`` requests, each a blank image and a prompt of ``prefix_tokens`` tokens, forced to ``new_tokens``."""
        height, width = model_input_size(self.processor)
        seq = self.processor.image_seq_length
        ids = [self.processor.image_token_id] * seq + [self.processor.tokenizer.bos_token_id] * max(1, prefix_tokens - seq)
        pixels = [np.zeros((height, width, 3), np.uint8)] * rows
        return self._generate(self.image_features(pixels), [Request(i, ids) for i in range(rows)], new_tokens, new_tokens)
