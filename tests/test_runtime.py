"""llmcli.runtime: the chunked cross-entropy against torch's, and what it saves in memory."""

import pytest
import torch
import torch.nn.functional as F

import llmcli.runtime as runtime
from llmcli.runtime import token_cross_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab, chunk", [(50, 120), (1000, 3000), (1000, 2**22)])
def test_chunked_cross_entropy_equals_torch_loss_and_gradients(monkeypatch, dtype, vocab, chunk):
    monkeypatch.setattr(runtime, "CROSS_ENTROPY_CHUNK", chunk)  # several chunks, a ragged last one, or one
    torch.manual_seed(0)
    logits = (3 * torch.randn(4, 9, vocab)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (4, 9))
    labels[0, :4] = -100
    ours = token_cross_entropy(logits, labels)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    reference = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
    (grad_reference,) = torch.autograd.grad(reference, logits)
    assert ours.dtype == torch.float32 and grad_ours.dtype == dtype
    assert abs(ours.item() - reference.item()) <= 1e-5 * reference.item()
    scale = grad_reference.float().abs().max()
    assert (grad_ours.float() - grad_reference.float()).abs().max() <= 1e-5 * scale
    assert torch.all(grad_ours[0, :4] == 0)  # ignored positions get no gradient


def test_no_scored_position_gives_nan_and_zero_gradients_as_torch_does():
    logits = torch.randn(2, 3, 11, requires_grad=True)
    labels = torch.full((2, 3), -100)
    for loss in (token_cross_entropy(logits, labels),
                 F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)):
        assert torch.isnan(loss)
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.equal(grad, torch.zeros_like(grad))


PEAKS = """
import json, torch
import torch.nn.functional as F
from llmcli.profiling.peak import PeakMemory
from llmcli.runtime import token_cross_entropy

torch.manual_seed(0)
logits = torch.randn(512, 32000, requires_grad=True)  # 65 MB
labels = torch.randint(0, 32000, (512,))
peaks = {}
for name, loss in (("plain", lambda: F.cross_entropy(logits, labels)),
                   ("chunked", lambda: token_cross_entropy(logits[None], labels[None]))):
    with PeakMemory(torch.device("cpu")) as peak:
        (grad,) = torch.autograd.grad(loss(), logits)
        del grad
    peaks[name] = peak.peak
print(json.dumps(peaks))
"""


def test_chunked_cross_entropy_needs_less_memory_than_the_plain_loss():
    """The plain loss keeps fp32 log-probabilities beside the logits and makes a gradient for each. Measured in a
    child process whose freed tensors go back to the OS (as memory-estimate --measure does): resident memory
    in a process that ran other tests first reflects what its heap kept, not these tensors."""
    import json
    import os
    import subprocess
    import sys

    from llmcli.profiling.memory_measure import MMAP_THRESHOLD

    child = subprocess.run([sys.executable, "-c", PEAKS], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "OMP_NUM_THREADS": "1"})
    assert child.returncode == 0, child.stderr[-2000:]
    peaks = json.loads(child.stdout)
    assert peaks["chunked"] < 0.7 * peaks["plain"], peaks


@pytest.mark.parametrize("flags, expected", [({"avx2", "fma"}, "fp32"), ({"avx2", "avx512f", "avx512_bf16"}, "bf16"),
                                             ({"avx2", "amx_tile", "amx_bf16"}, "bf16")])
def test_auto_precision_is_bf16_where_the_cpu_multiplies_bf16_natively(monkeypatch, flags, expected):
    from llmcli.errors import UserError

    monkeypatch.delenv("LLMCLI_PRECISION", raising=False)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(flags))
    cpu = torch.device("cpu")
    assert runtime.resolve_precision("auto", cpu) == expected
    assert runtime.resolve_precision("fp32", cpu) == "fp32"  # one flag away
    monkeypatch.setenv("LLMCLI_PRECISION", "fp32")
    assert runtime.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setenv("LLMCLI_PRECISION", "fp16")
    with pytest.raises(UserError, match="LLMCLI_PRECISION='fp16'"):
        runtime.resolve_precision("auto", cpu)


def test_auto_precision_runs_generate_and_training_in_bf16_on_such_a_cpu(monkeypatch, cli, model_dirs, corpus,
                                                                          tmp_path):
    monkeypatch.delenv("LLMCLI_PRECISION", raising=False)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    result = cli("generate", model_dirs["gpt"], "--prompt", "The", "--max-new-tokens", 4, "--json")
    assert result.exit_code == 0 and "precision bf16 (auto: bf16 is native here" in result.stderr
    trained = cli("train", "gpt-nano", "--data", corpus, "--steps", 2, "--batch-size", 2, "--seq-len", 16,
                  "--out", tmp_path / "run")
    assert trained.exit_code == 0, trained.stderr
    assert "cpu, bf16" in trained.stderr
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    result = cli("generate", model_dirs["gpt"], "--prompt", "The", "--max-new-tokens", 4, "--json")
    assert result.exit_code == 0 and "precision" not in result.stderr  # fp32, as without auto
