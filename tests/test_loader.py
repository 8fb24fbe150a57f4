"""Model loading: the embedded models, the safetensors cache, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import LlamaConfig

from ghostline.engine.loader import load, resolve
from ghostline.engine.model import UnsupportedModel


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model not found"):
        resolve(tmp_path / "nope.gguf")


def test_folder_without_config(tmp_path):
    with pytest.raises(UnsupportedModel, match="config.json"):
        resolve(tmp_path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(UnsupportedModel, match="gpt2"):
        load(tmp_path)


def test_dynamic_ntk_is_refused_before_reading_weights(tmp_path):
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModel, match="dynamic"):
        load(tmp_path)


def test_second_load_comes_from_the_safetensors_cache(smol):
    again = load("smollm2-135m")
    assert again.from_cache and again.seconds < 30
    assert again.model.args.n_layers == smol.model.args.n_layers == 30


def test_cli_reports_missing_model(tmp_path):
    f = tmp_path / "a.py"
    f.write_text("x = 1\n")
    r = subprocess.run([sys.executable, "-m", "ghostline", "complete", str(f), "--line", "1", "--col", "1",
                        "--model", str(tmp_path / "missing.gguf")], capture_output=True, text=True)
    assert r.returncode == 2 and "model not found" in r.stderr
