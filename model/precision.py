"""Which autocast dtype a run uses: `--amp auto` picks what the hardware
computes natively.

    amp, why = resolve_amp("auto", torch.device("cpu"))   # ('fp32', 'auto: this CPU has no bf16 ...')

- CUDA: bf16 from sm_80 (Ampere) up, fp16 with a gradient scaler below.
- CPU: bf16 only with native bf16 instructions (AMX or AVX512-BF16) that
  torch and oneDNN are allowed to use; else fp32. Without them bf16
  autocast is emulated: one forward and backward of the CPU profile's
  backbone (resnet18_quarter, batch 256, 32 px) took 18.5 s in bf16 and
  2.5 s in fp32 on a 2-core AMD EPYC with AVX2 only (issue 22's
  measurement, on a machine that has no bf16 instructions at all).
- `ATEN_CPU_CAPABILITY=avx2` and `ONEDNN_MAX_CPU_ISA=AVX2` (either one)
  make a CPU with bf16 behave as one without it, and auto follows them.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

AMP_CHOICES = ("auto", "bf16", "fp16", "fp32")
# oneDNN's ISA names at or above AVX512_CORE_BF16 all hold one of these
_ONEDNN_BF16 = ("BF16", "AMX", "AVX10", "FP16", "ALL")


def resolve_amp(requested: str, device: torch.device) -> tuple[str, str]:
    """(amp, why): `requested` unless it is 'auto'."""
    if requested != "auto":
        return requested, "asked for (--amp)"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return "bf16", f"auto: {torch.cuda.get_device_name(device)} (sm_{major}{minor}) computes bf16 natively"
        return "fp16", (f"auto: {torch.cuda.get_device_name(device)} (sm_{major}{minor}) has no bf16; "
                        f"fp16 with a gradient scaler")
    if device.type == "cpu":
        native, why = cpu_bf16()
        return ("bf16" if native else "fp32"), f"auto: {why}"
    return "fp32", f"auto: no rule for {device.type} devices"


def cpu_flags() -> set:
    """The CPU's feature flags (/proc/cpuinfo), or torch's own probe where there is no /proc."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    probes = (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_bf16", "_is_amx_tile_supported"))
    return {flag for flag, probe in probes if getattr(torch.cpu, probe, lambda: False)()}


def cpu_bf16() -> tuple[bool, str]:
    """Whether bf16 autocast runs on native instructions here, and why (not)."""
    native = [f for f in ("amx_bf16", "avx512_bf16") if f in cpu_flags()]
    if not native:
        return False, ("this CPU has no bf16 instructions (no amx_bf16, no avx512_bf16): bf16 would be emulated, "
                       "several times slower than fp32")
    capability = torch.backends.cpu.get_cpu_capability()  # honours ATEN_CPU_CAPABILITY
    if capability != "AVX512":
        return False, (f"the CPU has {', '.join(native)} but torch runs at {capability} "
                       f"(ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', 'unset')})")
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        isa = os.environ.get(var, "").upper()
        if isa and not any(tag in isa for tag in _ONEDNN_BF16):
            return False, f"the CPU has {', '.join(native)} but {var}={os.environ[var]} keeps oneDNN below bf16"
    return True, f"the CPU has {', '.join(native)}"
