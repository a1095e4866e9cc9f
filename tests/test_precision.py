import pytest
import torch

from protect import precision


def _matmul_dtype(precision_name: str) -> torch.dtype:
    with precision.autocast(torch.device("cpu"), precision_name):
        return (torch.ones(4, 4) @ torch.ones(4, 4)).dtype


def test_auto_uses_bf16_on_a_cpu_only_when_its_bf16_kernels_are_native(monkeypatch):
    # Emulated bf16 (AVX2-only CPUs) trains 8-12x slower than float32.
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert _matmul_dtype("auto") == torch.float32
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert _matmul_dtype("auto") == torch.bfloat16


def test_explicit_precisions_are_obeyed_and_unknown_ones_refused(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert _matmul_dtype("bf16") == torch.bfloat16
    assert _matmul_dtype("fp32") == torch.float32
    with pytest.raises(ValueError, match="precision must be auto, bf16 or fp32"):
        precision.autocast_dtype(torch.device("cpu"), "fp16")
