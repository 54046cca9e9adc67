"""Loading the PaliGemma processor and model from a hub id, a local folder or an object-storage folder.

An fsspec source is copied once per node into a cache (temporary folder, size check, then an atomic rename)
and every actor on that node reuses it. Only safetensors are loaded; remote code never runs. Knows nothing
of Ray.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec

from paligemma_batch.config import ModelConfig, StorageOptions

PROCESSOR_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
)
COMPLETE_MARKER = ".paligemma_batch_complete"


class ModelSourceError(ValueError):
    """``model.source`` names nothing loadable."""


@dataclass(frozen=True)
class Source:
    kind: str  # "hub" | "local" | "fsspec"
    location: str


def classify_source(source: str) -> Source:
    """Tell a hub id, a local folder and an fsspec URI apart."""
    protocol = fsspec.core.split_protocol(source)[0]
    if protocol and protocol not in ("file", "local"):
        return Source("fsspec", source.rstrip("/"))
    path = Path(fsspec.core.strip_protocol(source) if protocol else source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")):
        return Source("local", str(path.resolve()))
    parts = source.split("/")
    if len(parts) == 2 and all(parts):
        return Source("hub", source)
    raise ModelSourceError(f"'{source}' is neither a local folder, an fsspec URI nor a hub id (org/name)")


def default_cache_dir() -> Path:
    return Path(os.environ.get("PALIGEMMA_BATCH_CACHE", Path.home() / ".cache" / "paligemma_batch" / "models"))


def materialize(uri: str, storage: StorageOptions, cache_dir: str | Path | None = None, processor_only: bool = False) -> Path:
    """Copy the folder at ``uri`` into the node-local cache once and return the local folder.

    Concurrent callers on a node (several actors) serialize on a file lock; the first downloads into a
    temporary folder, checks every file's size against the listing, then renames it into place.
    """
    from paligemma_batch.sources import filesystem

    fs, root = filesystem(uri, storage)
    listing = {
        p[len(root.rstrip("/")) + 1 :]: info["size"]
        for p, info in fs.find(root, detail=True).items()
        if info.get("type") != "directory"
    }
    if processor_only:
        listing = {name: size for name, size in listing.items() if name in PROCESSOR_FILES}
    if "config.json" not in listing and not processor_only:
        raise ModelSourceError(f"{uri} holds no config.json")
    digest = hashlib.sha256(repr((uri, sorted(listing.items()))).encode()).hexdigest()[:16]
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = cache / f"{digest}{'-processor' if processor_only else ''}"
    if (target / COMPLETE_MARKER).exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / COMPLETE_MARKER).exists():
            return target
        tmp = cache / f"{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            for name, size in listing.items():
                local = tmp / name
                local.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{root.rstrip('/')}/{name}", str(local))
                if local.stat().st_size != size:
                    raise OSError(f"{name}: downloaded {local.stat().st_size} bytes, expected {size}")
            (tmp / COMPLETE_MARKER).write_text(uri)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def local_folder(cfg: ModelConfig, storage: StorageOptions, processor_only: bool = False) -> str:
    """Where ``from_pretrained`` should look: a local folder, or the hub id itself."""
    source = classify_source(cfg.source)
    if source.kind == "fsspec":
        return str(materialize(source.location, storage, cfg.cache_dir, processor_only))
    return source.location


def load_processor(cfg: ModelConfig, storage: StorageOptions):
    """The checkpoint's ``PaliGemmaProcessor`` (tokenizer + image processor); downloads no weights."""
    from transformers import AutoProcessor

    location = local_folder(cfg, storage, processor_only=True)
    revision = cfg.revision if classify_source(cfg.source).kind == "hub" else None
    processor = AutoProcessor.from_pretrained(location, revision=revision)
    processor.tokenizer.padding_side = "left"
    return processor


def torch_dtype(precision: str, on_gpu: bool):
    """The floating dtype of the non-quantized parts (and of activations) for a precision."""
    import torch

    if precision in ("int8", "int4"):
        return torch.bfloat16 if on_gpu else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[precision]


def quantization_config(precision: str, on_gpu: bool):
    """bitsandbytes settings for int8/int4 (nf4), else None."""
    if precision not in ("int8", "int4"):
        return None
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError(f"pip install bitsandbytes to use precision {precision} ({err})") from None
    if precision == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype(precision, on_gpu)
    )


def load_model(cfg: ModelConfig, storage: StorageOptions, num_gpus: float = 0):
    """Load the model in ``cfg.precision`` onto the visible GPUs (all of them, when ``num_gpus`` > 1) or the CPU."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    on_gpu = num_gpus > 0
    if on_gpu and not torch.cuda.is_available():
        raise RuntimeError(f"inference.num_gpus={num_gpus} but this worker sees no CUDA device")
    if on_gpu:
        device_map: str | dict = "auto" if torch.cuda.device_count() > 1 else {"": 0}
    else:
        device_map = {"": "cpu"}
    location = local_folder(cfg, storage)
    revision = cfg.revision if classify_source(cfg.source).kind == "hub" else None
    model = PaliGemmaForConditionalGeneration.from_pretrained(
        location,
        revision=revision,
        dtype=torch_dtype(cfg.precision, on_gpu),
        quantization_config=quantization_config(cfg.precision, on_gpu),
        attn_implementation=cfg.attn_implementation,
        device_map=device_map,
        use_safetensors=True,
        trust_remote_code=False,
    )
    return model.eval()
