"""Model sources (hub id + revision, local folder, bucket through the per-node cache), what loading refuses,
device placement, and a tiny PaliGemma 2 end to end."""

from __future__ import annotations

import http.client
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from conftest import job_config
from paligemma_batch.config import ModelConfig, StorageOptions
from paligemma_batch.model import (
    COMPLETE_MARKER,
    PROCESSOR_FILES,
    ModelSourceError,
    Source,
    classify_source,
    device_placement,
    load_model,
    load_processor,
    materialize,
    quantization_config,
    source_problems,
)
from paligemma_batch.pipeline import run, validate
from paligemma_batch.store import OutputStore

NO_STORAGE = StorageOptions()


class CountingProxy:
    """An HTTP proxy on 127.0.0.1 in front of the S3 endpoint that counts requests by (method, path, query)."""

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream).netloc
        self.requests: Counter[tuple[str, str, str]] = Counter()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _ForwardingHandler)
        self.server.daemon_threads = True
        self.server.proxy = self
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return "http://{}:{}".format(*self.server.server_address[:2])

    def object_gets(self, key: str) -> int:
        """GETs of one object (``bucket/key``)."""
        return sum(n for (method, path, query), n in self.requests.items()
                   if method == "GET" and path == f"/{key}" and not query)

    def listings(self) -> int:
        return sum(n for (method, _, query), n in self.requests.items() if method == "GET" and "list-type" in query)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _ForwardingHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        proxy: CountingProxy = self.server.proxy
        url = urlsplit(self.path)
        with proxy.lock:
            proxy.requests[(self.command, unquote(url.path), url.query)] += 1
        upstream = http.client.HTTPConnection(proxy.upstream, timeout=60)
        try:
            upstream.request(self.command, self.path, headers=dict(self.headers))
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("connection", "transfer-encoding", "content-length"):
                self.send_header(name, value)
        length = response.getheader("Content-Length") if self.command == "HEAD" else len(data)
        self.send_header("Content-Length", str(length or 0))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_HEAD = do_GET

    def log_message(self, format: str, *args) -> None:
        return


@pytest.fixture
def counting_proxy(s3_endpoint):
    proxy = CountingProxy(s3_endpoint)
    yield proxy
    proxy.close()


def _upload_model(fs, bucket: str, model_dir: Path, prefix: str = "models/tiny") -> str:
    for path in model_dir.iterdir():
        fs.put_file(str(path), f"{bucket}/{prefix}/{path.name}")
    fs.pipe_file(f"{bucket}/{prefix}/pytorch_model.bin", b"a pickle that must never be fetched")
    return f"s3://{bucket}/{prefix}/"


def _storage(endpoint: str) -> StorageOptions:
    return StorageOptions(endpoint_url=endpoint, key="testing", secret="testing")


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "source, kind, location",
    [
        ("google/paligemma2-3b-mix-224", "hub", "google/paligemma2-3b-mix-224"),
        ("s3://bucket/models/paligemma-3b-mix-224/", "fsspec", "s3://bucket/models/paligemma-3b-mix-224"),
        ("gs://bucket/models/pg", "fsspec", "gs://bucket/models/pg"),
        ("/nonexistent/models/pg", "local", "/nonexistent/models/pg"),
        ("file:///nonexistent/pg", "local", "/nonexistent/pg"),
    ],
)
def test_classify_source(source, kind, location):
    assert classify_source(source) == Source(kind, location)


def test_classify_source_local_before_hub(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    # An existing relative folder shaped like a hub id is the folder; a missing one is the hub id.
    assert classify_source("org/name") == Source("local", str(tmp_path / "org" / "name"))
    assert classify_source("org/other") == Source("hub", "org/other")
    assert classify_source("./org/other") == Source("local", str(tmp_path / "org" / "other"))
    for bad in ("not a model", "a/b/c", "single"):
        with pytest.raises(ModelSourceError, match="neither a local folder"):
            classify_source(bad)


def test_source_problems_name_the_key(tmp_path, tiny_model_dir):
    assert source_problems(ModelConfig(source=str(tiny_model_dir)), NO_STORAGE) == []

    pickled = _copy_model(tiny_model_dir, tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    assert source_problems(ModelConfig(source=str(pickled)), NO_STORAGE) == [
        f"model.source: {pickled} holds no *.safetensors weights (found pytorch_model.bin); only safetensors are "
        "loaded, convert the checkpoint first"
    ]

    llava = _copy_model(tiny_model_dir, tmp_path / "llava")
    config = json.loads((llava / "config.json").read_text())
    (llava / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    assert source_problems(ModelConfig(source=str(llava)), NO_STORAGE) == [
        f"model.source: {llava} is a 'llava' checkpoint, not PaliGemma"
    ]

    assert source_problems(ModelConfig(source=str(tmp_path / "empty")), NO_STORAGE) == [
        f"model.source: {tmp_path / 'empty'} holds no config.json"
    ]
    no_tokenizer = _copy_model(tiny_model_dir, tmp_path / "no-tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    assert source_problems(ModelConfig(source=str(no_tokenizer)), NO_STORAGE) == [
        f"model.source: {no_tokenizer} holds no tokenizer.json or tokenizer.model"
    ]
    with pytest.raises(ModelSourceError, match="holds no tokenizer.json or tokenizer.model"):
        load_processor(ModelConfig(source=str(no_tokenizer)), NO_STORAGE)
    assert source_problems(ModelConfig(source=str(tiny_model_dir), revision="bfloat16"), NO_STORAGE) == [
        "model.revision: applies to hub ids only"
    ]


def test_validate_rejects_what_cannot_run(tmp_path, tiny_model_dir, scene_shards, monkeypatch):
    def problems(**sections):
        config = job_config(tiny_model_dir, str(scene_shards[0]), str(tmp_path / "out"), **sections)
        return validate(config, check_resources=False)[0]

    model = {"source": str(tiny_model_dir), "max_new_tokens": 4}
    assert problems(model={**model, "precision": "int4"}) == []
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    assert problems(model={**model, "precision": "int4"}) == [
        "model.precision: int4 needs bitsandbytes (pip install bitsandbytes)"
    ]
    assert problems(model={**model, "precision": "bfloat16"}) == []
    assert problems(model=model, inference={"num_gpus": 1.5, "num_cpus": 0.5}) == [
        "inference.num_gpus: 1.5 can't be placed; Ray shares a GPU only in fractions of one, so above 1 use a "
        "whole number"
    ]
    assert problems(model=model, inference={"num_gpus": 0.5, "num_cpus": 0.5}) == []


def test_a_pickle_only_folder_fails_clearly(tmp_path, tiny_model_dir):
    """Only pytorch_model.bin: a reason, not a load (tests/test_security.py shows the pickle never runs)."""
    pickled = _copy_model(tiny_model_dir, tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ModelSourceError, match=r"holds no \*\.safetensors weights \(found pytorch_model.bin\)"):
        load_model(ModelConfig(source=str(pickled), precision="float32"), NO_STORAGE)


HUB_SCRIPT = r"""
import json, sys
from paligemma_batch.config import ModelConfig, StorageOptions
from paligemma_batch.model import ModelSourceError, load_model, load_processor, source_problems
from paligemma_batch.prompts import load_prompt_encoder

out = {}
for name, source, revision in [("main", "acme/tiny-paligemma", None), ("rev", "acme/tiny-paligemma", "gemma2"),
                               ("bad_rev", "acme/tiny-paligemma", "nope"), ("missing", "acme/missing", None)]:
    cfg = ModelConfig(source=source, revision=revision, precision="float32")
    entry = {"problems": source_problems(cfg, StorageOptions())}
    try:
        model = load_model(cfg, StorageOptions())
        entry["decoder"] = model.config.text_config.model_type
        entry["image_seq_length"] = load_processor(cfg, StorageOptions()).image_seq_length
        entry["encoder_image_tokens"] = load_prompt_encoder(cfg, StorageOptions()).ids("caption en")[:17].count(4)
    except ModelSourceError as err:
        entry["error"] = str(err)
    out[name] = entry
print("RESULT " + json.dumps(out))
"""


def test_hub_id_and_revision_from_hf_home_offline(tmp_path, tiny_model_dir, tiny_model_v2_dir):
    """Hub ids load through huggingface_hub: HF_HOME's cache, a named revision, and a clear offline error."""
    repo = tmp_path / "hf-home" / "hub" / "models--acme--tiny-paligemma"
    (repo / "refs").mkdir(parents=True)
    (repo / "blobs").mkdir()
    for revision, commit, folder in (("main", "a" * 40, tiny_model_dir), ("gemma2", "b" * 40, tiny_model_v2_dir)):
        (repo / "refs" / revision).write_text(commit)
        (repo / "snapshots" / commit).mkdir(parents=True)
        for path in folder.iterdir():  # the hub cache's layout: snapshot files link to content-named blobs
            blob = repo / "blobs" / f"{revision}-{path.name}"
            shutil.copyfile(path, blob)
            (repo / "snapshots" / commit / path.name).symlink_to(Path("..", "..", "blobs", blob.name))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", HUB_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert result["main"] == {"problems": [], "decoder": "gemma", "image_seq_length": 16, "encoder_image_tokens": 16}
    assert result["rev"] == {"problems": [], "decoder": "gemma2", "image_seq_length": 16, "encoder_image_tokens": 16}
    cache = tmp_path / "hf-home" / "hub"
    assert result["bad_rev"]["problems"] == [
        f"model.source: acme/tiny-paligemma at revision nope is not in the Hugging Face cache ({cache}) and "
        "HF_HUB_OFFLINE forbids downloading it"
    ]
    assert result["bad_rev"]["error"].startswith("cannot load model.source acme/tiny-paligemma at revision nope: ")
    assert result["missing"]["problems"][0].startswith("model.source: acme/missing is not in the Hugging Face cache")
    assert result["missing"]["error"].startswith("cannot load model.source acme/missing: ")


class TruncatingFileSystem(MemoryFileSystem):
    """The in-memory filesystem, except that downloaded weights arrive cut in half."""

    protocol = "truncating"

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace("truncating://", "memory://", 1))

    def get_file(self, rpath, lpath, **kwargs):
        super().get_file(rpath, lpath, **kwargs)
        if rpath.endswith(".safetensors"):
            with open(lpath, "r+b") as f:
                f.truncate(os.path.getsize(lpath) // 2)


@pytest.fixture
def memory_model(tiny_model_dir):
    """The tiny model in fsspec's in-memory filesystem; the path is unique per test."""
    fs = fsspec.filesystem("memory")
    root = f"/models/{os.urandom(4).hex()}"
    for path in tiny_model_dir.iterdir():
        fs.pipe_file(f"{root}/{path.name}", path.read_bytes())
    yield fs, root
    fs.rm(root, recursive=True)


def test_materialize_verifies_sizes_and_repairs_the_cache(tmp_path, tiny_model_dir, memory_model):
    fs, root = memory_model
    cache = tmp_path / "cache"
    fsspec.register_implementation("truncating", TruncatingFileSystem, clobber=True)
    with pytest.raises(OSError, match=r"model.safetensors: downloaded \d+ bytes, expected \d+"):
        materialize(f"truncating://{root}", NO_STORAGE, cache)
    assert [p.name for p in cache.iterdir()] == [p.name for p in cache.glob("*.lock")]  # no copy, no temp folder

    processor = materialize(f"memory://{root}", NO_STORAGE, cache, processor_only=True)
    assert sorted(p.name for p in processor.iterdir()) == sorted(
        [COMPLETE_MARKER] + [p.name for p in tiny_model_dir.iterdir() if p.name in PROCESSOR_FILES])
    target = materialize(f"memory://{root}", NO_STORAGE, cache)
    assert target != processor and (target / COMPLETE_MARKER).read_text() == f"memory://{root}"
    for path in tiny_model_dir.iterdir():
        assert (target / path.name).read_bytes() == path.read_bytes()
    assert materialize(f"memory://{root}", NO_STORAGE, cache, processor_only=True) == target  # reuses the full copy

    stale = cache / f"{target.name}.tmp-deadbeef"
    stale.mkdir()
    (target / "model.safetensors").write_bytes(b"corrupted")  # a damaged copy is fetched again
    assert materialize(f"memory://{root}", NO_STORAGE, cache) == target
    assert (target / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    assert not stale.exists()

    fs.pipe_file(f"{root}/config.json", fs.cat_file(f"{root}/config.json") + b" ")  # a changed checkpoint
    assert materialize(f"memory://{root}", NO_STORAGE, cache) != target

    fs.rm(f"{root}/model.safetensors")
    with pytest.raises(ModelSourceError, match="holds no \\*.safetensors weights"):
        materialize(f"memory://{root}", NO_STORAGE, cache)


def _materialize_in_child(uri: str, endpoint: str, cache: str, barrier, results) -> None:
    barrier.wait()
    results.put(str(materialize(uri, _storage(endpoint), cache)))


def test_two_processes_materialize_with_one_download(tmp_path, s3_bucket, counting_proxy, tiny_model_dir):
    fs, bucket = s3_bucket
    uri = _upload_model(fs, bucket, tiny_model_dir)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    children = [ctx.Process(target=_materialize_in_child,
                            args=(uri, counting_proxy.url, str(tmp_path / "cache"), barrier, results))
                for _ in range(2)]
    for child in children:
        child.start()
    folders = {results.get(timeout=120) for _ in children}
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert len(folders) == 1
    folder = Path(folders.pop())
    for path in tiny_model_dir.iterdir():
        assert counting_proxy.object_gets(f"{bucket}/models/tiny/{path.name}") == 1, path.name
        assert (folder / path.name).read_bytes() == path.read_bytes()
    assert counting_proxy.object_gets(f"{bucket}/models/tiny/pytorch_model.bin") == 0
    assert not list((tmp_path / "cache").glob("*.tmp-*"))


def test_bucket_model_two_actors_one_download(ray_local, tmp_path, s3_bucket, counting_proxy, tiny_model_dir,
                                              scene_shards):
    fs, bucket = s3_bucket
    uri = _upload_model(fs, bucket, tiny_model_dir)
    storage = {"endpoint_url": counting_proxy.url, "key": "testing", "secret": "testing"}
    cache = tmp_path / "node-cache"
    config = job_config(
        tiny_model_dir, str(scene_shards[0]), str(tmp_path / "out"),
        model={"source": uri, "precision": "float32", "max_new_tokens": 4, "cache_dir": str(cache),
               "storage_options": storage},
        inference={"batch_size": 2, "min_actors": 2, "max_actors": 2, "num_cpus": 0.5},
    )
    summary = run(config)
    assert summary["rows_written"] == 4 * 2 and summary["rows_error"] == 0
    rows = OutputStore(str(tmp_path / "out"), NO_STORAGE).read_run(summary["run_id"]).to_pylist()
    assert {r["model_id"] for r in rows} == {uri} and {r["status"] for r in rows} == {"ok"}
    # validate and the driver's processor list the folder once each; each actor lists it for its processor
    # and for its model: two actors reached the bucket, and every file was fetched once for the node.
    assert counting_proxy.listings() == 2 + 2 * 2
    for path in tiny_model_dir.iterdir():
        gets = counting_proxy.object_gets(f"{bucket}/models/tiny/{path.name}")
        assert gets == (2 if path.name == "config.json" else 1), path.name  # validate reads config.json too
    assert counting_proxy.object_gets(f"{bucket}/models/tiny/pytorch_model.bin") == 0
    copies = [p.name.endswith("-processor") for p in cache.iterdir() if p.is_dir()]
    assert sorted(copies) == [False, True]  # the model, and the processor the driver loaded first


@pytest.mark.parametrize(
    "num_gpus, visible, expected",
    [
        (0, 0, ({"": "cpu"}, [])),
        (0, 4, ({"": "cpu"}, [])),  # a GPU node does not turn a CPU stage into a GPU stage
        (0.5, 1, ({"": 0}, [0])),
        (1, 1, ({"": 0}, [0])),
        (2, 2, ("auto", [0, 1])),
        (4, 8, ("auto", [0, 1, 2, 3])),  # only as many GPUs as the config gives the actor
    ],
)
def test_device_placement_follows_the_config(num_gpus, visible, expected):
    assert device_placement(num_gpus, visible) == expected


def test_device_placement_refuses_missing_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(RuntimeError, match=r"inference.num_gpus=2 but this worker sees 1 CUDA device\(s\) "
                                           r"\(CUDA_VISIBLE_DEVICES='3'\)"):
        device_placement(2, 1)
    with pytest.raises(RuntimeError, match="inference.num_gpus=1 but this worker sees 0 CUDA"):
        device_placement(1, 0)


def test_quantization_settings():
    import torch

    assert quantization_config("float32", False) is None and quantization_config("bfloat16", True) is None
    assert quantization_config("int8", True).load_in_8bit
    for on_gpu, compute in ((True, torch.bfloat16), (False, torch.float32)):
        q = quantization_config("int4", on_gpu)
        assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_compute_dtype == compute


@pytest.fixture(scope="module")
def tiny_v2_32px(tmp_path_factory) -> Path:
    """A tiny PaliGemma 2 at 32 px: 4 image tokens instead of the 64 px fixture's 16."""
    from paligemma_batch.fixtures.tiny import build_tiny_paligemma

    return build_tiny_paligemma(tmp_path_factory.mktemp("tiny-paligemma2-32px"), version=2, image_size=32)


def test_paligemma2_resolution_comes_from_the_checkpoint(tiny_model_v2_dir, tiny_v2_32px, scene_shards):
    import numpy as np

    from paligemma_batch.engines.transformers_engine import TransformersEngine, Request, model_input_size, prompt_ids

    for folder, size, tokens in ((tiny_model_v2_dir, 64, 16), (tiny_v2_32px, 32, 4)):
        cfg = ModelConfig(source=str(folder), precision="float32")
        processor, model = load_processor(cfg, NO_STORAGE), load_model(cfg, NO_STORAGE)
        assert model.config.text_config.model_type == "gemma2"
        assert model_input_size(processor) == (size, size) and processor.image_seq_length == tokens
        ids = prompt_ids(processor, "caption en")
        assert ids[:tokens] == [processor.image_token_id] * tokens and ids[tokens] != processor.image_token_id
        engine = TransformersEngine(model, processor, max_new_tokens=3)
        pixels = [np.full((size, size, 3), 100 + 50 * i, np.uint8) for i in range(2)]
        assert tuple(engine.pixel_values(pixels).shape) == (2, 3, size, size)
        out = engine.generate(pixels, [Request(0, ids), Request(1, ids)])
        assert [g.num_input_tokens for g in out] == [len(ids)] * 2 and all(g.num_output_tokens >= 1 for g in out)


def test_paligemma2_end_to_end(ray_local, tmp_path, tiny_v2_32px, scene_shards):
    config = job_config(tiny_v2_32px, str(scene_shards[0]), str(tmp_path / "out"),
                        tasks=[{"task": "caption"}, {"task": "detect", "objects": ["circle"]}])
    summary = run(config)
    assert summary["rows_written"] == 4 * 2 and summary["rows_error"] == 0
    rows = OutputStore(str(tmp_path / "out"), NO_STORAGE).read_run(summary["run_id"]).to_pylist()
    processor = load_processor(config.model, NO_STORAGE)
    from paligemma_batch.engines.transformers_engine import prompt_ids

    for row in rows:
        assert row["status"] == "ok" and row["num_output_tokens"] >= 1
        assert row["num_input_tokens"] == len(prompt_ids(processor, row["prompt"])) == 4 + 1 + len(
            processor.tokenizer(row["prompt"] + "\n", add_special_tokens=False)["input_ids"])
