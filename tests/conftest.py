"""Shared fixtures: a tiny PaliGemma built in code, a real S3 endpoint (moto's server on 127.0.0.1), a local
Ray with 2 CPUs, and synthetic WebDataset shards."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Credentials must be in the driver's environment before Ray starts, so workers inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny PaliGemma 1 saved with save_pretrained."""
    from paligemma_batch.fixtures.tiny import build_tiny_paligemma

    return build_tiny_paligemma(tmp_path_factory.mktemp("tiny-paligemma"))


@pytest.fixture(scope="session")
def tiny_model_v2_dir(tmp_path_factory) -> Path:
    """A random tiny PaliGemma 2 (Gemma 2 decoder)."""
    from paligemma_batch.fixtures.tiny import build_tiny_paligemma

    return build_tiny_paligemma(tmp_path_factory.mktemp("tiny-paligemma2"), version=2)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    """The tiny model (float32, eval) and its processor with left padding, torch at one thread meanwhile."""
    import torch
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    processor.tokenizer.padding_side = "left"
    model = PaliGemmaForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from more, and spinning threads stall on a busy CPU
    yield model, processor
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def vae_npz(tmp_path_factory) -> Path:
    """A random mask codec with vae-oid.npz's keys (narrow widths, so it decodes fast)."""
    from paligemma_batch.fixtures.vae import random_vae_arrays, save_vae_npz

    path = tmp_path_factory.mktemp("vae") / "vae-oid.npz"
    save_vae_npz(random_vae_arrays(seed=1, embedding_dim=32, channels=32), str(path))
    return path


@pytest.fixture(scope="session")
def scene_shards(tmp_path_factory) -> list[Path]:
    """Three WebDataset tars of 4 synthetic scenes each (jpg/png + json ground truth)."""
    from paligemma_batch.fixtures.scenes import write_scene_shards

    return write_scene_shards(tmp_path_factory.mktemp("shards"), shards=3, per_shard=4, seed=7)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session: 2 CPUs, its own short temp dir."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="pgb-ray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, logging_level="WARNING")
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A real S3 endpoint: moto's threaded server on 127.0.0.1, on a free port."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket; returns (s3fs filesystem, bucket name)."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, key="testing", secret="testing")
    name = "pgb-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    fs.mkdir(name)
    yield fs, name
    fs.rm(name, recursive=True)


def job_config(model_dir: Path, input_uri, output_uri: str, **sections):
    """A small valid JobConfig for tests; ``sections`` override whole top-level sections."""
    from paligemma_batch.config import parse_config

    data = {
        "input": {"uri": input_uri, "format": "webdataset"},
        "tasks": [{"task": "caption", "lang": "en"}, {"task": "prompt", "prompt": "describe the colours"}],
        "model": {"source": str(model_dir), "precision": "float32", "max_new_tokens": 8},
        "inference": {"batch_size": 4, "num_cpus": 0.5},
        "preprocess": {"num_cpus": 0.5, "batch_size": 8},
        "output": {"uri": output_uri},
        "ray": {"num_cpus": 2, "progress_bars": False},
    }
    for key, value in sections.items():
        data[key] = value
    return parse_config(data)
