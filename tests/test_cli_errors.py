"""One-line errors from every command (exit 2; a traceback only with --debug), ``--set`` on list items, YAML
errors with their position, and the COCO export writing images a COCO tool opens."""

from __future__ import annotations

import json
import os
import subprocess

from PIL import Image
from pycocotools.coco import COCO

from test_cli import CLI, _cli, _write_config
from test_results import truth_rows, write_output


def _no_endpoint_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, env=dict(env, RAY_ADDRESS=""))


def _one_error_line(result, starts: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {starts}"), result.stderr
    assert "Traceback" not in result.stderr


def test_reading_commands_on_an_unreachable_s3_root_print_one_line(tmp_path):
    for command in (["runs"], ["inspect"], ["export"]):
        result = _no_endpoint_cli(*command, "s3://pgb-nowhere/out")
        _one_error_line(result, "s3://pgb-nowhere/out: cannot reach it: ")
    result = _cli("runs", "s3://pgb-nowhere/out", "--endpoint-url", "http://127.0.0.1:9")
    _one_error_line(result, "s3://pgb-nowhere/out: cannot reach it: ")
    result = _cli("inspect", str(tmp_path / "none"), "--endpoint-url", "ftp://x")
    _one_error_line(result, "--endpoint-url: must be an http:// or https:// URL")


def test_set_addresses_list_items(tmp_path, tiny_model_dir, scene_shards):
    config = _write_config(tmp_path, tiny_model_dir, scene_shards[0])
    assert _cli("validate", str(config), "--set", "tasks.0.lang=de").returncode == 0
    _one_error_line(_cli("validate", str(config), "--set", "tasks.0.lang=xx"), "tasks.0: ")
    _one_error_line(_cli("validate", str(config), "--set", "tasks.3.lang=de"), "tasks.3: no item 3; the list has 1")
    _one_error_line(_cli("validate", str(config), "--set", "tasks.first.lang=de"), "tasks.first: tasks is a list")


def test_yaml_errors_name_their_line_and_column(tmp_path, tiny_model_dir, scene_shards):
    config = _write_config(tmp_path, tiny_model_dir, scene_shards[0])
    _one_error_line(_cli("validate", str(config), "--set", "input.uri=[unclosed"),
                    "input.uri (--set): invalid YAML at line 1, column 10: expected ',' or ']'")
    broken = tmp_path / "broken.yaml"
    broken.write_text("input:\n  uri: x\n  format: [a\ntasks: []\n")
    _one_error_line(_cli("validate", str(broken)), f"{broken}: invalid YAML at line 4, column 6: ")
    _one_error_line(_cli("validate", str(tmp_path / "absent.yaml")), f"{tmp_path / 'absent.yaml'}: cannot read")


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "_RUNS.json").write_text("{not json")
    _one_error_line(_cli("runs", str(tmp_path)), "Expecting property name enclosed in double quotes")
    result = _cli("--debug", "runs", str(tmp_path))
    assert result.returncode != 0 and "Traceback (most recent call last)" in result.stderr


def test_coco_export_writes_images_a_coco_tool_opens(tmp_path, scene_shards):
    out, images = tmp_path / "out", tmp_path / "coco-images"
    rows = truth_rows(scene_shards)
    write_output(str(out), rows)
    result = _cli("export", str(out), "--images", str(images))
    assert result.returncode == 0, result.stderr
    assert "images: 12 written to" in result.stdout
    coco = COCO(str(out / "coco.json"))
    sizes = {r["image_id"]: (r["width"], r["height"]) for r in rows}
    for image in coco.loadImgs(coco.getImgIds()):
        with Image.open(images / image["file_name"]) as img:  # the folder a COCO tool is given
            assert img.size == sizes[image["paligemma_image_id"]] == (image["width"], image["height"])
    assert len({i["file_name"] for i in coco.loadImgs(coco.getImgIds())}) == 12
    assert json.loads((out / "coco.json").read_text())["info"]["images_unreadable"] == []
