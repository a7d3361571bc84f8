"""`gateway check-model`: a checkpoint's tensor names and shapes against the model class,
read from safetensors headers with the model built on the meta device."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_model
from gateway.cli import main
from gateway.models.llama import LlamaForCausalLM

NUM_TENSORS = 1 + 2 * 9 + 1 + 1     # embeddings, 2 layers x (7 projections + 2 norms), norm, lm_head


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory, default_model_dir):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", default_model_dir)


def copy_model(source, target):
    shutil.copytree(source, target)
    return target


def test_a_matching_directory_passes(good_dir, capsys):
    assert main(["check-model", str(good_dir)]) == 0
    out = capsys.readouterr().out
    assert f"OK: {NUM_TENSORS} tensors match; 0 missing, 0 unexpected, 0 shape mismatches" in out
    assert "PASS" in out


def test_a_renamed_tensor_and_wrong_shapes_fail_naming_each(good_dir, tmp_path, capsys):
    broken = copy_model(good_dir, tmp_path / "broken")
    tensors = load_file(broken / "model.safetensors")
    tensors["model.final_norm.weight"] = tensors.pop("model.norm.weight")
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 100)
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(48, 64)   # a shard of merged qkv
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    assert main(["check-model", str(broken)]) == 1
    out = capsys.readouterr().out
    assert "missing: model.norm.weight (expected shape [64])" in out
    assert "unexpected: model.final_norm.weight (shape [64])" in out
    assert ("shape mismatch: model.layers.0.mlp.down_proj.weight: model expects [64, 128], "
            "checkpoint has [64, 100]") in out
    assert "shape mismatch: model.layers.1.self_attn.k_proj.weight: model expects [32, 64]" in out
    assert f"OK: {NUM_TENSORS - 3} tensors match" in out and "FAIL" in out


def test_the_model_is_built_on_the_meta_device(good_dir, monkeypatch):
    devices = set()
    real = LlamaForCausalLM.checkpoint_names

    def spy(self):
        devices.update(p.device.type for p in self.parameters())
        return real(self)
    monkeypatch.setattr(LlamaForCausalLM, "checkpoint_names", spy)
    assert main(["check-model", str(good_dir)]) == 0
    assert devices == {"meta"}


def test_a_model_module_registers_the_architecture_it_checks(good_dir, tmp_path, capsys):
    custom = copy_model(good_dir, tmp_path / "custom")
    config = json.loads((custom / "config.json").read_text())
    config["architectures"] = ["MyLlamaForCausalLM"]
    (custom / "config.json").write_text(json.dumps(config))
    module = tmp_path / "my_models.py"
    module.write_text("from gateway.models.llama import LlamaForCausalLM\n"
                      "from gateway.models.registry import register_model\n"
                      "register_model('MyLlamaForCausalLM', LlamaForCausalLM)\n")
    assert main(["check-model", str(custom)]) == 2
    assert "unsupported architecture" in capsys.readouterr().err
    assert main(["check-model", str(custom), "--model-module", str(module)]) == 0


def test_a_gguf_file_is_checked_through_its_converted_directory(capsys):
    from gateway.models.loader import default_model_path
    assert main(["check-model", str(default_model_path())]) == 0
    assert "0 missing, 0 unexpected, 0 shape mismatches" in capsys.readouterr().out


def test_a_missing_path_is_a_clear_error(tmp_path, capsys):
    assert main(["check-model", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
