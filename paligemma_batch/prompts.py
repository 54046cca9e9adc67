"""The prompt token ids and image size PaliGemmaProcessor would give, read from a checkpoint's files alone.

The CPU stage tokenizes every prompt and resizes every image. Importing transformers for that costs seconds
in every CPU worker process and in the driver; the `tokenizers` library and three JSON files are enough.
transformers' ``GemmaTokenizer`` keeps the vocabulary, merges and added tokens of ``tokenizer.json`` but sets
its own normalizer, pre-tokenizer and byte fallback, so :func:`gemma_tokenizer` does the same. Tests assert
the ids equal ``PaliGemmaProcessor``'s on every checkpoint the project builds.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers

from paligemma_batch.config import ModelConfig, StorageOptions

IMAGE_TOKEN = "<image>"
SETTINGS_FILES = ("preprocessor_config.json", "processor_config.json", "tokenizer_config.json")

_TOKENIZERS: dict[str, Tokenizer] = {}  # per process, by digest of the tokenizer JSON


def use_gemma_pipeline(tokenizer: Tokenizer) -> Tokenizer:
    """Set the normalizer, pre-tokenizer, decoder and byte fallback that transformers' ``GemmaTokenizer`` sets."""
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.model.byte_fallback = True
    return tokenizer


def gemma_tokenizer(tokenizer_json: str) -> Tokenizer:
    """``tokenizer.json`` as transformers' ``GemmaTokenizer`` uses it."""
    return use_gemma_pipeline(Tokenizer.from_str(tokenizer_json))


@dataclass(frozen=True)
class PromptEncoder:
    """What the CPU stage needs from the processor; small to pickle apart from the tokenizer JSON."""

    tokenizer_json: str
    digest: str  # sha256 of tokenizer_json: the per-process cache key
    image_token_id: int
    image_seq_length: int  # image tokens before <bos>
    bos_token_id: int
    size: tuple[int, int]  # model input (height, width)
    resample: int  # the PIL filter of the image processor

    @classmethod
    def from_files(cls, tokenizer_json: str, settings: dict[str, dict]) -> PromptEncoder:
        """From the text of ``tokenizer.json`` and the parsed ``SETTINGS_FILES`` that exist (name → dict)."""
        processor = settings.get("processor_config.json", {})
        image = {**settings.get("preprocessor_config.json", {}), **processor.get("image_processor", {})}
        tokenizer = gemma_tokenizer(tokenizer_json)
        bos = settings.get("tokenizer_config.json", {}).get("bos_token", "<bos>")
        bos = bos["content"] if isinstance(bos, dict) else bos
        seq_length = processor.get("image_seq_length", image.get("image_seq_length"))
        ids = {name: tokenizer.token_to_id(name) for name in (IMAGE_TOKEN, bos)}
        missing = [name for name, i in ids.items() if i is None] + (["image_seq_length"] if seq_length is None else [])
        if missing or "size" not in image:
            raise ValueError(f"the processor files lack {', '.join(missing) or 'the image size'}")
        encoder = cls(
            tokenizer_json=tokenizer_json,
            digest=hashlib.sha256(tokenizer_json.encode()).hexdigest(),
            image_token_id=ids[IMAGE_TOKEN],
            image_seq_length=int(seq_length),
            bos_token_id=ids[bos],
            size=(int(image["size"]["height"]), int(image["size"]["width"])),
            resample=int(image.get("resample", 3)),
        )
        _TOKENIZERS[encoder.digest] = tokenizer
        return encoder

    @classmethod
    def from_folder(cls, folder: str | Path) -> PromptEncoder:
        folder = Path(folder)
        settings = {name: json.loads((folder / name).read_text()) for name in SETTINGS_FILES if (folder / name).is_file()}
        return cls.from_files((folder / "tokenizer.json").read_text(), settings)

    def ids(self, prompt: str) -> list[int]:
        """``<image>`` × N, ``<bos>``, the prompt's tokens, then the tokens of ``"\\n"``, as PaliGemmaProcessor builds."""
        return [self.image_token_id] * self.image_seq_length + [self.bos_token_id] + list(self._text_ids(prompt + "\n"))

    def count_tokens(self, text: str) -> int:
        """How many tokens ``text`` takes (a task's budget counts the object names it may generate)."""
        return len(self._text_ids(text))

    def _text_ids(self, text: str) -> tuple[int, ...]:
        if self.digest not in _TOKENIZERS:
            _TOKENIZERS[self.digest] = gemma_tokenizer(self.tokenizer_json)
        return _text_ids(self.digest, text)

    def clip_ids(self, prompt: str, num_frames: int) -> list[int]:
        """One prompt over ``num_frames`` images: ``<image>`` × (frames × N), ``<bos>``, the prompt, ``"\n"``, as
        PaliGemmaProcessor builds for several images per prompt."""
        single = self.ids(prompt)
        return [self.image_token_id] * (self.image_seq_length * (num_frames - 1)) + single


@functools.lru_cache(maxsize=4096)
def _text_ids(digest: str, text: str) -> tuple[int, ...]:
    """Fixed prompts repeat for every image; per-image questions mostly don't, hence a bounded cache."""
    return tuple(_TOKENIZERS[digest].encode(text, add_special_tokens=False).ids)


def load_prompt_encoder(cfg: ModelConfig, storage: StorageOptions) -> PromptEncoder:
    """The encoder of ``model.source`` (hub id + revision, local folder or fsspec URI); fetches no weights."""
    from paligemma_batch.model import ModelSourceError, classify_source, loading_error, local_folder

    if classify_source(cfg.source).kind != "hub":
        return PromptEncoder.from_folder(local_folder(cfg, storage, processor_only=True))
    from huggingface_hub import snapshot_download

    try:  # honours HF_HOME, HF_TOKEN and HF_HUB_OFFLINE like from_pretrained
        folder = snapshot_download(cfg.source, revision=cfg.revision, allow_patterns=["tokenizer.json", *SETTINGS_FILES])
    except OSError as err:
        raise loading_error(cfg, err) from err
    if not (Path(folder) / "tokenizer.json").is_file():
        raise ModelSourceError(f"model.source {cfg.source} has no tokenizer.json")
    return PromptEncoder.from_folder(folder)
