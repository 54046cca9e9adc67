"""Loading the PaliGemma processor and model from a hub id, a local folder or an object-storage folder.

- A hub id (with ``revision``) loads through huggingface_hub, which honours ``HF_HOME``, ``HF_TOKEN`` and
  ``HF_HUB_OFFLINE``.
- A local folder loads in place.
- An fsspec URI is copied once per node into a cache (file lock, temporary folder, size check, atomic rename),
  and every actor on that node reuses the copy.

Only safetensors load, and only the PaliGemma classes are used, so checkpoint code never runs. The precision
decides the dtype and the bitsandbytes quantization; ``num_gpus`` from the config decides the placement.
Knows nothing of Ray.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec

from paligemma_batch.config import ModelConfig, StorageOptions
from paligemma_batch.storage import filesystem

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
# Weight formats that are never loaded (pickles can run code), so never downloaded either.
UNLOADED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack", ".npz", ".gguf", ".onnx")
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
    if protocol or path.exists() or source.startswith((".", "/", "~")):
        return Source("local", str(path.resolve()))
    parts = source.split("/")
    if len(parts) == 2 and all(parts):
        return Source("hub", source)
    raise ModelSourceError(f"'{source}' is neither a local folder, an fsspec URI nor a hub id (org/name)")


def checkpoint_problem(names) -> str | None:
    """Why a folder holding the files ``names`` is not a loadable checkpoint, or None when it is."""
    names = set(names)
    if "config.json" not in names:
        return "holds no config.json"
    if not any(n.endswith(".safetensors") for n in names):
        others = sorted(n for n in names if n.endswith(UNLOADED_WEIGHTS))
        found = f" (found {', '.join(others)})" if others else ""
        return f"holds no *.safetensors weights{found}; only safetensors are loaded, convert the checkpoint first"
    if not names & {"processor_config.json", "preprocessor_config.json"}:
        return "holds no processor_config.json or preprocessor_config.json"
    if not names & {"tokenizer.json", "tokenizer.model"}:
        return "holds no tokenizer.json or tokenizer.model"
    return None


def model_type_problem(config_json: bytes | str) -> str | None:
    """Why a checkpoint's config.json does not describe a PaliGemma (1 or 2), or None."""
    model_type = json.loads(config_json).get("model_type")
    return None if model_type == "paligemma" else f"is a '{model_type}' checkpoint, not PaliGemma"


def source_problems(cfg: ModelConfig, storage: StorageOptions) -> list[str]:
    """Problems with ``model.source`` found without loading anything: one line each, naming the key.

    Local and fsspec folders are listed and their config.json read. A hub id is looked up in the local cache
    only when ``HF_HUB_OFFLINE`` forbids downloading it (otherwise the hub answers at load time).
    """
    try:
        source = classify_source(cfg.source)
    except ModelSourceError as err:
        return [f"model.source: {err}"]
    if source.kind != "hub" and cfg.revision:
        return ["model.revision: applies to hub ids only"]
    try:
        if source.kind == "fsspec":
            fs, root = filesystem(source.location, storage)
            names = _listing(fs, root)
            config_json = fs.cat_file(f"{root}/config.json") if "config.json" in names else b"{}"
        else:
            folder = (Path(source.location) if source.kind == "local"
                      else _offline_hub_folder(source.location, cfg.revision))
            if folder is None:
                return []
            names = _local_files(folder)
            config_json = (folder / "config.json").read_bytes() if "config.json" in names else b"{}"
        problem = checkpoint_problem(names) or model_type_problem(config_json)
    except ModelSourceError as err:
        return [f"model.source: {err}"]
    except Exception as err:  # any storage client error (credentials, endpoint, permissions) is a config problem
        return [f"model.source: cannot read {cfg.source}: {type(err).__name__}: {err}"]
    return [f"model.source: {cfg.source} {problem}"] if problem else []


def _offline_hub_folder(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot folder of a hub id when the hub is offline; None when online."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.is_offline_mode():
        return None
    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if not isinstance(cached, str):
        at = f" at revision {revision}" if revision else ""
        raise ModelSourceError(f"{repo_id}{at} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                               "HF_HUB_OFFLINE forbids downloading it")
    return Path(cached).parent


def _local_files(folder: Path) -> list[str]:
    """The files of a local folder, symlinks (as in the hub cache) followed."""
    return [p.name for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []


def _listing(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, tuple[int, str | None]]:
    """The top-level files of a checkpoint folder: name → (size, ETag when the store gives one)."""
    root = root.rstrip("/")
    try:
        entries = fs.ls(root, detail=True, refresh=True)  # never a listing cached earlier in this process
    except FileNotFoundError:
        return {}
    return {
        info["name"].rstrip("/").rsplit("/", 1)[-1]: (int(info["size"]), info.get("ETag") or info.get("etag"))
        for info in entries
        if info.get("type") == "file"
    }


def default_cache_dir() -> Path:
    return Path(os.environ.get("PALIGEMMA_BATCH_CACHE", Path.home() / ".cache" / "paligemma_batch" / "models"))


def _cache_name(uri: str, listing: dict) -> str:
    return hashlib.sha256(repr((uri, sorted(listing.items()))).encode()).hexdigest()[:16]


def _is_complete(folder: Path, listing: dict[str, tuple[int, str | None]]) -> bool:
    """A finished copy whose files all still have their listed sizes."""
    return (folder / COMPLETE_MARKER).exists() and all(
        (folder / name).is_file() and (folder / name).stat().st_size == size for name, (size, _) in listing.items()
    )


def materialize(uri: str, storage: StorageOptions, cache_dir: str | Path | None = None,
                processor_only: bool = False) -> Path:
    """Copy the checkpoint folder at ``uri`` into the node-local cache once and return the local folder.

    Concurrent callers on a node (several actors) serialize on a file lock; the first downloads into a
    temporary folder, checks every file's size against the listing, then renames it into place. The cache
    key covers the URI and every file's size and ETag, so a changed checkpoint is fetched again. Weights in
    formats that are never loaded are not fetched; processor files already cached are copied, not fetched.
    """
    fs, root = filesystem(uri, storage)
    root = root.rstrip("/")
    everything = _listing(fs, root)
    problem = checkpoint_problem(everything)
    if problem:
        raise ModelSourceError(f"{uri} {problem}")
    listing = {name: v for name, v in everything.items() if not name.endswith(UNLOADED_WEIGHTS)}
    processor_listing = {name: v for name, v in listing.items() if name in PROCESSOR_FILES}
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    full = cache / _cache_name(uri, listing)
    processor = cache / f"{_cache_name(uri, processor_listing)}-processor"
    if _is_complete(full, listing):
        return full
    target, wanted = (processor, processor_listing) if processor_only else (full, listing)
    if _is_complete(target, wanted):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(target, wanted):
            return target
        for stale in cache.glob(f"{target.name}.tmp-*"):  # left by a process that died holding this lock
            shutil.rmtree(stale, ignore_errors=True)
        reuse_processor = target != processor and _is_complete(processor, processor_listing)
        tmp = cache / f"{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            fetch = [name for name in wanted if not (reuse_processor and name in processor_listing)]
            for name in set(wanted) - set(fetch):
                shutil.copyfile(processor / name, tmp / name)
            fs.get([f"{root}/{name}" for name in fetch], [str(tmp / name) for name in fetch])  # concurrent on buckets
            for name, (size, _) in wanted.items():
                if (tmp / name).stat().st_size != size:
                    raise OSError(f"{uri}/{name}: downloaded {(tmp / name).stat().st_size} bytes, expected {size}")
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
    if source.kind == "local":
        problem = checkpoint_problem(_local_files(Path(source.location)))
        if problem:
            raise ModelSourceError(f"{source.location} {problem}")
    return source.location


def _hub_revision(cfg: ModelConfig) -> str | None:
    return cfg.revision if classify_source(cfg.source).kind == "hub" else None


def loading_error(cfg: ModelConfig, err: OSError) -> ModelSourceError:
    at = f" at revision {cfg.revision}" if cfg.revision else ""
    return ModelSourceError(f"cannot load model.source {cfg.source}{at}: {err}")


def load_processor(cfg: ModelConfig, storage: StorageOptions):
    """The checkpoint's ``PaliGemmaProcessor`` (tokenizer + image processor); downloads no weights.

    Resolution and image token count come from the checkpoint's processor config.
    """
    from transformers import PaliGemmaProcessor

    location = local_folder(cfg, storage, processor_only=True)
    try:
        processor = PaliGemmaProcessor.from_pretrained(location, revision=_hub_revision(cfg), trust_remote_code=False)
    except OSError as err:
        raise loading_error(cfg, err) from err
    processor.tokenizer.padding_side = "left"
    return processor


def torch_dtype(precision: str, on_gpu: bool):
    """The floating dtype of the non-quantized parts (and of activations) for a precision."""
    import torch

    if precision in ("int8", "int4"):
        return torch.bfloat16 if on_gpu else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[precision]


def cpu_int4_skips(model_config) -> list[str] | None:
    """Modules to keep unquantized for int4 on the CPU, or None for transformers' default.

    bitsandbytes' CPU 4-bit kernel packs weights in blocks of 32 outputs and 64 inputs; SigLIP-So400m's MLP
    (4304 wide) fits neither, so those Linears stay in the compute dtype, next to the default skips (the output
    embedding).
    """
    import torch
    from transformers import PaliGemmaForConditionalGeneration
    from transformers.quantizers.base import get_keys_to_not_convert

    with torch.device("meta"):
        skeleton = PaliGemmaForConditionalGeneration(model_config)
    odd = [n for n, m in skeleton.named_modules()
           if isinstance(m, torch.nn.Linear) and (m.out_features % 32 or m.in_features % 64)]
    return sorted(set(get_keys_to_not_convert(skeleton)) | set(odd)) if odd else None


def quantization_config(precision: str, on_gpu: bool, model_config=None):
    """bitsandbytes settings for int8/int4 (nf4), else None; ``model_config`` lets int4 on CPU skip what it
    can't pack."""
    if precision not in ("int8", "int4"):
        return None
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError(f"pip install bitsandbytes to use precision {precision} ({err})") from None
    if precision == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    skips = cpu_int4_skips(model_config) if model_config is not None and not on_gpu else None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch_dtype(precision, on_gpu),
        llm_int8_skip_modules=skips,
    )


def attention_implementation(model_config, requested: str) -> str | dict[str, str]:
    """``requested`` for every part that supports it. Gemma 2's decoder can't use SDPA (its attention logits
    are soft-capped), so with "sdpa" a PaliGemma 2 runs eager attention in the decoder and SDPA in SigLIP."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    parts = {"text_config": model_config.text_config, "vision_config": model_config.vision_config}
    supported = {key: MODEL_MAPPING[type(part)]._supports_sdpa for key, part in parts.items()}
    if requested != "sdpa" or all(supported.values()):
        return requested
    return {"": "sdpa", **{key: "sdpa" if ok else "eager" for key, ok in supported.items()}}


def device_placement(num_gpus: float, visible_gpus: int) -> tuple[str | dict, list[int]]:
    """``device_map`` for an actor that holds ``num_gpus`` GPUs (from the config), and the GPUs it spreads over.

    Ray narrows ``CUDA_VISIBLE_DEVICES`` to the actor's own GPUs, so those are the first visible devices.
    More than one GPU gives ``device_map="auto"`` limited to them (through ``max_memory``, no CPU offload).
    """
    if num_gpus == 0:
        return {"": "cpu"}, []
    wanted = max(1, math.ceil(num_gpus))
    if visible_gpus < wanted:
        raise RuntimeError(
            f"inference.num_gpus={num_gpus:g} but this worker sees {visible_gpus} CUDA device(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )
    if wanted == 1:
        return {"": 0}, [0]
    return "auto", list(range(wanted))


def load_model(cfg: ModelConfig, storage: StorageOptions, num_gpus: float = 0):
    """Load the model in ``cfg.precision`` onto the actor's ``num_gpus`` GPUs, or the CPU when it is 0."""
    import torch
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    on_gpu = num_gpus > 0
    device_map, gpus = device_placement(num_gpus, torch.cuda.device_count() if on_gpu else 0)
    max_memory = {i: torch.cuda.mem_get_info(i)[0] for i in gpus} if len(gpus) > 1 else None
    location = local_folder(cfg, storage)
    revision = _hub_revision(cfg)
    try:
        model_config = PaliGemmaConfig.from_pretrained(location, revision=revision)
        model = PaliGemmaForConditionalGeneration.from_pretrained(
            location,
            config=model_config,
            revision=revision,
            dtype=torch_dtype(cfg.precision, on_gpu),
            quantization_config=quantization_config(cfg.precision, on_gpu, model_config),
            attn_implementation=attention_implementation(model_config, cfg.attn_implementation),
            device_map=device_map,
            max_memory=max_memory,
            use_safetensors=True,
            trust_remote_code=False,
        )
    except OSError as err:
        raise loading_error(cfg, err) from err
    return model.eval()
