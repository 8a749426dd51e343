"""Tolerances sized the way FlashAttention's tests size them: a kernel's error against an fp32
reference may be at most a small multiple of the error that the same math done by torch in the
low precision makes against that fp32 reference (plus a floor for exact-zero cases)."""
from __future__ import annotations

import torch


def assert_close_to_reference(out, ref_fp32, ref_lowp, *, factor: float = 2.0, floor: float = 1e-5,
                              name: str = "output"):
    assert out.shape == ref_fp32.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_fp32.shape)}"
    out, ref, low = out.float(), ref_fp32.float(), ref_lowp.float()
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten or NaN outputs)"
    err = (out - ref).abs().max().item()
    base = (low - ref).abs().max().item()
    bound = factor * base + floor
    assert err <= bound, f"{name}: max error {err:.3e} > {factor} x torch low-precision error " \
                         f"{base:.3e} + {floor:.0e}"
