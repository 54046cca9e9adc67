"""Security: only safetensors load and remote code never runs; storage credentials stay out of every output;
config values are validated; tar member names are only ever keys (see also test_sources and test_bad_inputs)."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from bad_corpus import image_samples, tar_bytes
from paligemma_batch.config import ConfigError, ModelConfig, StorageOptions, parse_config
from paligemma_batch.masks import MaskDecoder
from paligemma_batch.model import load_model, load_processor

SECRET = "SUPERSECRET-XYZ"
ACCESS_KEY = "AKIASUPERKEY-XYZ"
CLI = str(Path(sys.executable).with_name("paligemma-batch"))


class _Tripwire:
    """Unpickling this creates ``path``: proof that a pickle was loaded."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def _model_without_safetensors(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    return dst


def test_a_pickle_only_checkpoint_is_never_loaded(tmp_path, tiny_model_dir):
    folder = _model_without_safetensors(tiny_model_dir, tmp_path / "pickled-model")
    tripwire = tmp_path / "pickle-was-loaded"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(tripwire)))
    with pytest.raises((OSError, ValueError), match="safetensors"):
        load_model(ModelConfig(source=str(folder), precision="float32"), StorageOptions())
    assert not tripwire.exists()


def test_remote_code_in_a_checkpoint_never_runs(tmp_path, tiny_model_dir):
    folder = tmp_path / "remote-code-model"
    shutil.copytree(tiny_model_dir, folder)
    tripwire = tmp_path / "remote-code-ran"
    for module in ("evil_modeling", "evil_processing"):
        (folder / f"{module}.py").write_text(f"open({str(tripwire)!r}, 'w').write('{module}')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_modeling.EvilConfig", "AutoModel": "evil_modeling.EvilModel",
                          "AutoModelForImageTextToText": "evil_modeling.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    processor_config = json.loads((folder / "processor_config.json").read_text())
    processor_config["auto_map"] = {"AutoProcessor": "evil_processing.EvilProcessor"}
    (folder / "processor_config.json").write_text(json.dumps(processor_config))
    cfg = ModelConfig(source=str(folder), precision="float32")
    outcomes = []
    for load in (lambda: load_processor(cfg, StorageOptions()), lambda: load_model(cfg, StorageOptions())):
        try:
            outcomes.append(type(load()).__name__)
        except ValueError as err:  # refusing to run the remote code is a fine outcome too
            outcomes.append(f"refused: {err}".splitlines()[0])
    print(f"remote-code checkpoint: {outcomes}")
    assert not tripwire.exists(), outcomes
    assert outcomes[1] == "PaliGemmaForConditionalGeneration"


def test_a_mask_decoder_file_holding_pickles_is_refused(tmp_path):
    tripwire = tmp_path / "npz-pickle-was-loaded"
    path = tmp_path / "vae-oid.npz"
    np.savez(path, evil=np.array([_Tripwire(tripwire)], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        MaskDecoder.from_npz(str(path))
    assert not tripwire.exists()


def _job(model_dir: Path, endpoint: str, bucket: str, **storage) -> dict:
    return {
        "input": {"uri": f"s3://{bucket}/shards/*.tar", "storage_options": {"endpoint_url": endpoint, **storage}},
        "tasks": [{"task": "caption"}],
        "model": {"source": str(model_dir), "precision": "float32", "max_new_tokens": 4},
        "inference": {"batch_size": 8, "num_cpus": 0.5},
        "preprocess": {"num_cpus": 0.5, "max_image_pixels": 4_000_000},
        "output": {"uri": f"s3://{bucket}/out"},
        "ray": {"num_cpus": 2, "progress_bars": False},
    }


def test_config_errors_name_the_key_and_never_echo_a_secret():
    base = _job(Path("/nonexistent"), "http://127.0.0.1:9", "bucket")
    cases = {
        "input.storage_options.secrte": ("unknown key", SECRET),
        "input.storage_options.secret": ("Input should be a valid string", 98765432123),
        "input.storage_options.endpoint_url": ("must not hold credentials", f"http://AKIA:{SECRET}@127.0.0.1:9"),
        "input.storage_options.retries": ("greater than or equal to 0", -1),
        "input.storage_options.retry_mode": ("'standard' or 'adaptive'", "forever"),
    }
    for dotted, (message, value) in cases.items():
        data = json.loads(json.dumps(base))
        data["input"]["storage_options"].update({"secret": SECRET, dotted.rsplit(".", 1)[1]: value})
        with pytest.raises(ConfigError) as err:
            parse_config(data)
        assert err.value.problems == [f"{dotted}: {err.value.problems[0].split(': ', 1)[1]}"]
        assert message in str(err.value) and str(value) not in str(err.value) and SECRET not in str(err.value)
    config = parse_config({**base, "input": {**base["input"], "storage_options": {
        "endpoint_url": "http://127.0.0.1:9", "key": ACCESS_KEY, "secret": SECRET}}})
    shown = [repr(config), str(config), config.model_dump_json(), json.dumps(config.model_dump(mode="json")),
             repr(config.input.storage_options), config.fingerprint()]
    assert not [s for s in shown if SECRET in s or ACCESS_KEY in s]
    assert config.input.storage_options.to_fsspec()["secret"] == SECRET  # still usable where it is needed


def _parquet_text(data: bytes) -> str:
    """Everything a Parquet file says: schema metadata, file metadata and every value."""
    f = pq.ParquetFile(io.BytesIO(data))
    metadata = {**(f.schema_arrow.metadata or {}), **(f.metadata.metadata or {})}
    return repr(metadata) + json.dumps(f.read().to_pylist(), default=str)


def test_credentials_never_reach_logs_outputs_or_the_run_index(tmp_path, s3_bucket, s3_endpoint, tiny_model_dir,
                                                              scene_shards):
    fs, bucket = s3_bucket
    fs.put(str(scene_shards[0]), f"{bucket}/shards/{scene_shards[0].name}")
    fs.pipe(f"{bucket}/shards/odd-images.tar", tar_bytes(image_samples(np.random.default_rng(5))[:8]))
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(_job(tiny_model_dir, s3_endpoint, bucket)))
    ray_tmp = tempfile.mkdtemp(prefix="pgb-sec-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env.update(RAY_TMPDIR=ray_tmp, AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1")
    sets = ["--set", f"input.storage_options.key={ACCESS_KEY}", "--set", f"input.storage_options.secret={SECRET}"]
    try:
        done = subprocess.run([CLI, "run", str(config_path), *sets], env=env, capture_output=True, text=True,
                              timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        console = done.stdout + done.stderr
        leaks = ["stdout/stderr"] if SECRET in console or ACCESS_KEY in console else []
        ray_files = [p for p in Path(ray_tmp).rglob("*") if p.is_file() and not p.is_symlink()]
        leaks += [str(p) for p in ray_files if any(s.encode() in p.read_bytes() for s in (SECRET, ACCESS_KEY))]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    objects = fs.find(f"{bucket}/out")
    parts = [o for o in objects if o.endswith(".parquet")]
    for path in objects:
        data = fs.cat_file(path)
        text = _parquet_text(data) if path in parts else data.decode()
        if SECRET in text or ACCESS_KEY in text or SECRET.encode() in data:
            leaks.append(path)
    print(f"searched stdout+stderr ({len(console)} chars), {len(ray_files)} Ray log/session "
          f"files and {len(objects)} output objects ({len(parts)} Parquet): leaks {leaks}")
    assert leaks == []
    assert {"_RUNS.json", "_SUMMARY.json"} <= {o.rsplit("/", 1)[-1] for o in objects} and parts
    assert len(ray_files) > 5  # the logs were really there to search
    rows = sum(pq.ParquetFile(io.BytesIO(fs.cat_file(p))).metadata.num_rows for p in parts)
    assert rows == 4 + 8  # the shard's scenes and the odd images, one caption row each, errors included
