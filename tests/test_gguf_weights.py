"""GGUF tensors read directly (gateway/models/gguf_weights.py): Hugging Face names, q/k rows
un-permuted for rotary, column slices on whole blocks, and check-model's bytes by type."""

import pytest
import torch

from gateway.cli import main
from gateway.models.gguf_weights import GGUFTensor, iter_gguf, rotary_row_order
from gateway.models.loader import default_model_path


def test_dequantized_tensors_equal_transformers_conversion_exactly(default_model_dir):
    """Same names, same shapes, same values as the cached transformers conversion (which
    un-permutes q/k itself), so the mapping and the row order are right."""
    from safetensors import safe_open
    handle = safe_open(str(default_model_dir / "model.safetensors"), framework="pt")
    seen = set()
    for name, tensor in iter_gguf(default_model_path(), progress=False):
        torch.testing.assert_close(tensor.dequantize().float(), handle.get_tensor(name), rtol=0, atol=0)
        seen.add(name)
    assert seen == set(handle.keys())


def test_rotary_row_order_turns_interleaved_pairs_into_halves():
    # one head of 8 rows: GGUF rows (pairs) 0 1 | 2 3 | 4 5 | 6 7 → HF halves 0 2 4 6 | 1 3 5 7
    assert rotary_row_order(8, 1).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert rotary_row_order(8, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("start,length", [(0, 64), (32, 96), (160, 32)])
def test_block_aligned_column_slices_are_raw_bytes_of_the_same_values(start, length):
    name, tensor = next((n, t) for n, t in iter_gguf(default_model_path(), progress=False)
                        if n.endswith("layers.0.mlp.down_proj.weight"))
    part = tensor.narrow(1, start, length)
    assert isinstance(part, GGUFTensor) and tuple(part.shape) == (576, length)
    torch.testing.assert_close(part.dequantize(), tensor.dequantize()[:, start:start + length], rtol=0, atol=0)


def test_a_column_slice_inside_a_block_is_dequantized_and_logged(caplog):
    _, tensor = next((n, t) for n, t in iter_gguf(default_model_path(), progress=False)
                     if n.endswith("layers.0.mlp.down_proj.weight"))
    with caplog.at_level("INFO", logger="gateway.loader"):
        part = tensor.narrow(1, 16, 40)
    assert isinstance(part, torch.Tensor)
    torch.testing.assert_close(part, tensor.dequantize()[:, 16:56], rtol=0, atol=0)
    assert "split a 32-element block" in caplog.text and "Q4_1" in caplog.text


def test_check_model_prints_the_gguf_bytes_by_type(capsys):
    assert main(["check-model", str(default_model_path())]) == 0
    out = capsys.readouterr().out
    assert "272 tensors match" in out
    assert "weights by type: 92.1 MiB (q4_1 63.3 MiB, q8_0 28.7 MiB, f32 0.1 MiB)" in out
