"""Every config mistake that would turn every row into an error stops at ``validate`` (and ``run``) through the
CLI: one line naming the key, exit 2, nothing written. A run whose rows all fail alike for a configuration
reason stops uncommitted and leaves the output root free for the fixed config."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from bad_corpus import encode, solid
from conftest import job_config
from test_cli import _cli, _snapshot


def _config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _base(tmp_path: Path, model_dir: Path, input_section: dict, **model) -> dict:
    return {
        "input": input_section,
        "tasks": [{"task": "caption"}],
        "model": {"source": str(model_dir), "precision": "float32", **model},
        "inference": {"num_cpus": 0.5},
        "output": {"uri": str(tmp_path / "out")},
        "ray": {"num_cpus": 2, "num_gpus": 0},
    }


@pytest.fixture
def parquet_file(tmp_path) -> Path:
    path = tmp_path / "data" / "part-0.parquet"
    path.parent.mkdir()
    jpeg = encode(solid((6, 5), (9, 9, 9)), "JPEG")
    pq.write_table(pa.table({"image": [jpeg] * 3, "key": ["a", "b", "c"], "q": ["what?"] * 3}), path)
    return path


def _broken_model(tmp_path: Path, model_dir: Path) -> Path:
    copy = tmp_path / "broken-model"
    shutil.copytree(model_dir, copy)
    (copy / "model.safetensors").write_bytes(b"\xff" * 64)
    return copy


def _bad_npz(tmp_path: Path) -> Path:
    path = tmp_path / "vae-oid.npz"
    path.write_bytes(b"not a zip at all")
    return path


CASES = {
    "brace range matching nothing": ({"uri": "SHARDS/scenes-{00010..00013}.tar"}, {},
                                     "input.uri: no webdataset shards at"),
    "plain path that does not exist": ({"uri": "SHARDS/scenes-typo.tar"}, {}, "input.uri: no webdataset shards at"),
    "misspelled parquet image column": ({"uri": "PARQUET", "format": "parquet", "image_column": "img"}, {},
                                        "input.image_column: 'img' is not a column of"),
    "misspelled parquet id column": ({"uri": "PARQUET", "format": "parquet", "id_column": "kee"}, {},
                                     "input.id_column: 'kee' is not a column of"),
    "per-image field in no sample": ({"uri": "SHARDS/scenes-00000.tar"}, {}, "tasks.0.question_key: 'json.questoin' "
                                     "is in none of the first 4 samples"),
    "missing mask decoder": ({"uri": "SHARDS/scenes-00000.tar"}, {"mask_decoder": "/nonexistent/vae-oid.npz"},
                             "model.mask_decoder: /nonexistent/vae-oid.npz does not exist"),
    "mask decoder that is no npz": ({"uri": "SHARDS/scenes-00000.tar"}, {"mask_decoder": "BAD_NPZ"},
                                    "model.mask_decoder: "),
    "model file that is no safetensors": ({"uri": "SHARDS/scenes-00000.tar"}, {"source": "BROKEN_MODEL"},
                                          "model.source: model.safetensors in"),
    "unreachable input store": ({"uri": "s3://pgb-none/shards/*.tar",
                                 "storage_options": {"endpoint_url": "http://127.0.0.1:9"}}, {},
                                "input.uri: cannot reach s3://pgb-none/shards/*.tar: "),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_mistake_is_one_line_naming_its_key(case, tmp_path, tiny_model_dir, scene_shards, parquet_file):
    input_section, model, expected = CASES[case]
    names = {"SHARDS": str(scene_shards[0].parent), "PARQUET": str(parquet_file.parent),
             "BAD_NPZ": str(_bad_npz(tmp_path)) if "npz" in case else "",
             "BROKEN_MODEL": str(_broken_model(tmp_path, tiny_model_dir)) if "safetensors" in case else ""}

    def fill(value):
        for name, real in names.items():
            value = value.replace(name, real) if isinstance(value, str) else value
        return value

    data = _base(tmp_path, tiny_model_dir, {k: fill(v) for k, v in input_section.items()},
                 **{k: fill(v) for k, v in model.items()})
    if "per-image" in case:
        data["tasks"] = [{"task": "answer", "question_key": "json.questoin"}]
    config = _config(tmp_path, data)
    before = _snapshot(tmp_path)
    result = _cli("validate", str(config))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {expected}"), result.stderr
    assert _snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_the_fixed_config_validates_after_a_mistake(tmp_path, tiny_model_dir, parquet_file):
    good = _base(tmp_path, tiny_model_dir, {"uri": str(parquet_file.parent), "format": "parquet", "id_column": "key"})
    good["tasks"] = [{"task": "answer", "question_key": "q"}]
    bad = yaml.safe_load(yaml.safe_dump(good))
    bad["tasks"][0]["question_key"] = "question"
    assert _cli("validate", str(_config(tmp_path, bad))).stderr.startswith(
        "error: tasks.0.question_key: 'question' is not a column of")
    result = _cli("validate", str(_config(tmp_path, good)))
    assert result.returncode == 0 and result.stdout.startswith("ok: 1 shards"), result.stderr


def test_validate_verbose_lists_skipped_files(tmp_path, tiny_model_dir, scene_shards):
    folder = tmp_path / "shards"
    shutil.copytree(scene_shards[0].parent, folder)
    (folder / "README.md").write_text("x")
    (folder / "stats.csv").write_text("x")
    result = _cli("validate", str(_config(tmp_path, _base(tmp_path, tiny_model_dir, {"uri": str(folder)}))),
                  "--verbose")
    assert result.returncode == 0, result.stderr
    assert "3 shards" in result.stdout and "2 files skipped (1 .csv, 1 .md)" in result.stdout
    assert f"  skipped  {folder / 'README.md'}" in result.stdout


def test_a_run_whose_rows_all_fail_for_a_config_reason_stops_uncommitted(ray_local, tmp_path, tiny_model_dir,
                                                                        parquet_file, monkeypatch):
    """A mistake validate cannot see (here: its input check switched off) still leaves no finished run behind."""
    from paligemma_batch import checks, pipeline
    from paligemma_batch.config import ConfigError

    out = tmp_path / "out"
    (parquet_file.parent / "README.md").write_text("not a shard: counted in the summary")
    section = {"uri": str(parquet_file.parent), "format": "parquet", "id_column": "kee"}
    config = job_config(tiny_model_dir, section["uri"], str(out), input=section)
    monkeypatch.setattr(checks, "input_problems", lambda *args: [])
    with pytest.raises(ConfigError) as info:
        pipeline.run(config)
    assert info.value.problems[0].startswith("input.image_column/id_column: the first 2 rows all failed alike")
    assert "missing column(s) ['kee']" in info.value.problems[0]
    assert not out.exists()
    monkeypatch.undo()
    fixed = job_config(tiny_model_dir, section["uri"], str(out), input={**section, "id_column": "key"})
    summary = pipeline.run(fixed)
    assert summary.status == "finished" and summary.rows_ok == 3 * len(fixed.tasks)
    assert summary.skipped_files == {"md": 1}
