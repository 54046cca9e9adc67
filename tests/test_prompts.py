"""The CPU stage's prompt encoder: PaliGemmaProcessor's ids and input size, without transformers."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import PaliGemmaProcessor

from paligemma_batch.fixtures.demo import SHAPES_MODEL
from paligemma_batch.prompts import PromptEncoder, _TOKENIZERS

PROMPTS = ["caption en", "caption es", "answer en what color is the circle?", "detect cat ; dog ; red car",
           "segment square", "ocr", "  two leading spaces", "trailing space ", "tab\tand\nnewline",
           "Ünïcødé: 日本語のテキスト", "emoji 🐱 in text", "question fr où est le chat ?", "<loc0001> literal"]


def _assert_matches_processor(folder: Path) -> None:
    processor = PaliGemmaProcessor.from_pretrained(folder)
    encoder = PromptEncoder.from_folder(folder)
    size = processor.image_processor.size
    assert encoder.size == (size["height"], size["width"])
    assert encoder.resample == int(processor.image_processor.resample)
    for prompt in PROMPTS:
        expected = processor(text=prompt, images=np.zeros((8, 8, 3), np.uint8))["input_ids"][0]
        assert encoder.ids(prompt) == list(expected), prompt


@pytest.mark.parametrize("which", ["tiny", "tiny_v2", "shapes_fixture"])
def test_ids_and_size_equal_the_processor(which, tiny_model_dir, tiny_model_v2_dir):
    folder = {"tiny": tiny_model_dir, "tiny_v2": tiny_model_v2_dir, "shapes_fixture": Path(SHAPES_MODEL)}[which]
    _assert_matches_processor(folder)


def test_tokenizer_json_pipeline_is_replaced_as_transformers_does(tiny_model_dir, tmp_path):
    """A tokenizer.json with another normalizer, pre-tokenizer and no byte fallback: GemmaTokenizer overrides them."""
    folder = tmp_path / "metaspace"
    shutil.copytree(tiny_model_dir, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
    spec["model"]["byte_fallback"] = False
    next_id = 1 + max([*spec["model"]["vocab"].values(), *(t["id"] for t in spec["added_tokens"])])
    spec["model"]["vocab"].update({f"<0x{b:02X}>": next_id + b for b in range(256)})  # byte fallback for the emoji
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    _assert_matches_processor(folder)


def test_flat_preprocessor_config_as_on_the_hub(tiny_model_dir, tmp_path):
    """Hub checkpoints keep image settings in a flat preprocessor_config.json, not processor_config.json."""
    folder = tmp_path / "flat"
    shutil.copytree(tiny_model_dir, folder)
    nested = json.loads((folder / "processor_config.json").read_text())
    flat = {**nested["image_processor"], "processor_class": "PaliGemmaProcessor", "size": {"height": 48, "width": 48},
            "image_seq_length": 9}
    (folder / "preprocessor_config.json").write_text(json.dumps(flat))
    (folder / "processor_config.json").unlink()
    encoder = PromptEncoder.from_folder(folder)
    assert encoder.size == (48, 48) and encoder.image_seq_length == 9
    _assert_matches_processor(folder)


def test_pickled_encoder_rebuilds_its_tokenizer(tiny_model_dir):
    encoder = PromptEncoder.from_folder(tiny_model_dir)
    expected = encoder.ids("caption de")
    copy = pickle.loads(pickle.dumps(encoder))
    _TOKENIZERS.clear()  # as in a fresh worker process
    assert copy.ids("caption de") == expected and len(pickle.dumps(encoder)) < 2 * len(encoder.tokenizer_json) + 4096


def test_missing_settings_are_named(tiny_model_dir, tmp_path):
    folder = tmp_path / "no-size"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "processor_config.json").unlink()
    with pytest.raises(ValueError, match="lack image_seq_length"):
        PromptEncoder.from_folder(folder)


CPU_STAGE_SCRIPT = r"""
import sys
import pyarrow as pa
from paligemma_batch.config import JobConfig
from paligemma_batch.prompts import load_prompt_encoder
from paligemma_batch.distributed.stages import row_to_dict
from paligemma_batch.readers import iter_rows
from paligemma_batch.distributed.stages import SOURCE_SCHEMA, PreprocessPlan, preprocess

config = JobConfig.model_validate({"input": {"uri": sys.argv[1]}, "output": {"uri": sys.argv[2]},
                                   "model": {"source": sys.argv[3]}, "tasks": [{"task": "caption"}]})
rows = [row_to_dict(r) for r in iter_rows(sys.argv[1], config.input, [])]
out = preprocess(pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA),
                 PreprocessPlan.create(config, load_prompt_encoder(config.model, config.model_storage)))
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print("RESULT", out.num_rows, sum(e is None for e in out["error"].to_pylist()), heavy)
"""


def test_cpu_stage_imports_neither_torch_nor_transformers(tiny_model_dir, scene_shards, tmp_path):
    """The driver's encoder and the CPU workers' preprocessing stay light: no torch or transformers import."""
    done = subprocess.run([sys.executable, "-c", CPU_STAGE_SCRIPT, str(scene_shards[0]), str(tmp_path / "out"),
                           str(tiny_model_dir)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    rows, ok, heavy = done.stdout.split("RESULT ", 1)[1].split(" ", 2)
    assert int(rows) > 0 and ok == rows and heavy.strip() == "[]"


def test_tiny_tokenizer_tokenizes_alike_before_and_after_a_save(tmp_path):
    """The fixtures' tokenizer in memory splits text as its reloaded copy does."""
    from transformers import AutoTokenizer

    from paligemma_batch.fixtures.tiny import build_tokenizer

    built = build_tokenizer()
    built.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for prompt in PROMPTS:
        ids = built(prompt, add_special_tokens=False)["input_ids"]
        assert ids == reloaded(prompt, add_special_tokens=False)["input_ids"], prompt
        assert built.decode(ids) == reloaded.decode(ids), prompt


def test_training_script_tokenizer_is_the_shipped_fixtures():
    """``fixtures/train.py`` rebuilds the shipped fixture's vocabulary (its training command stays reproducible)."""
    from transformers import AutoTokenizer

    from paligemma_batch.fixtures.tiny import build_tokenizer

    assert build_tokenizer(seed=0).get_vocab() == AutoTokenizer.from_pretrained(SHAPES_MODEL).get_vocab()
