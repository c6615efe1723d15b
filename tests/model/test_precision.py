"""model/precision.py: --amp auto picks bf16 only where it is native, with
the capability mocked both ways, and follows ATEN_CPU_CAPABILITY /
ONEDNN_MAX_CPU_ISA as torch itself does."""
import subprocess
import sys

import pytest
import torch

from model import precision
from model.precision import resolve_amp

ROOT = precision.Path(__file__).resolve().parents[2]


def test_an_explicit_choice_is_kept():
    for amp in ("bf16", "fp16", "fp32"):
        assert resolve_amp(amp, torch.device("cpu"))[0] == amp


@pytest.mark.parametrize("capability, want", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"), ((6, 0), "fp16")])
def test_cuda_gets_bf16_from_ampere_and_fp16_before(monkeypatch, capability, want):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    amp, why = resolve_amp("auto", torch.device("cuda", 0))
    assert amp == want and f"sm_{capability[0]}{capability[1]}" in why


@pytest.mark.parametrize("flags, capability, env, want", [
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", {}, "bf16"),
    ({"avx2", "amx_bf16", "amx_tile", "avx512_bf16"}, "AVX512", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, "bf16"),
    ({"avx2", "avx512f"}, "AVX512", {}, "fp32"),                                   # AVX-512 without bf16
    ({"avx2", "fma"}, "AVX2", {}, "fp32"),                                         # AVX2 only
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX2", {"ATEN_CPU_CAPABILITY": "avx2"}, "fp32"),
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", {"ONEDNN_MAX_CPU_ISA": "AVX2"}, "fp32"),
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", {"DNNL_MAX_CPU_ISA": "avx512_core"}, "fp32"),
])
def test_cpu_gets_bf16_only_where_it_is_native_and_allowed(monkeypatch, flags, capability, env, want):
    for var in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    amp, why = resolve_amp("auto", torch.device("cpu"))
    assert amp == want, why
    assert why.startswith("auto: ")
    for var in env:
        assert want == "bf16" or var in why


def test_the_real_machine_follows_the_isa_variables():
    """In a fresh process, as a user would set them: with both variables
    this machine never gets bf16, whatever its CPU."""
    code = "from model.precision import resolve_amp; import torch; print(*resolve_amp('auto', torch.device('cpu')))"
    env = {"PATH": "/usr/bin:/bin", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "fp32", out.stdout
