"""Checkpoint conversion: any supported format -> any other, streamed, checked, atomic.

``convert_checkpoint`` is the library entry point; ``mixer-convert`` (mixer_convert.tools.cli) is a thin
CLI over it. Converting to PyTorch/timm imports torch only; to Flax formats, flax only; npz
and safetensors need neither.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mixer_convert.errors import CheckpointError
from mixer_convert.load import NonFiniteWeightsError, open_checkpoint, read_params
from mixer_convert.save import Output
from mixer_convert.source import MAX_BYTES
from mixer_convert.spec import MixerConfig

__all__ = ["ConversionReport", "NonFiniteWeightsError", "VerificationError", "convert_checkpoint", "verify_conversion"]


class VerificationError(CheckpointError):
    """--verify found the written file wrong; nothing was written."""


@dataclasses.dataclass
class ConversionReport:
    src: str
    dst: str
    fmt: str
    layout: str
    config: MixerConfig
    num_params: int
    nbytes: int
    readback_exact: bool | None = None
    logits_max_abs: float | None = None
    logits_tolerance: float | None = None
    logits_nonfinite: int = 0
    verified_with: str | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{self.src} -> {self.dst} ({self.fmt}, {self.layout} naming)",
                 f"  model: {self.config}", f"  {self.num_params:,} parameters, {self.nbytes / 2**20:.1f} MiB"]
        if self.readback_exact is not None:
            lines.append(f"  read back: {'bit-identical' if self.readback_exact else 'DIFFERENT'}")
        if self.logits_max_abs is not None:
            lines.append(f"  probe logits max-abs difference ({self.verified_with}): {self.logits_max_abs:.3e} "
                         f"(tolerance {self.logits_tolerance:.1e})"
                         + (f"; {self.logits_nonfinite} logits NaN/Inf (allowed)" if self.logits_nonfinite else ""))
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _progress(total_bytes: int, enabled: bool | None):
    from tqdm.auto import tqdm

    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="convert",
               disable=enabled is False or (enabled is None and total_bytes < 64 * 2**20), file=sys.stderr)

    def step(key: str, arr: np.ndarray) -> None:
        bar.update(arr.nbytes)
    return bar, step


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, to: str | None = None, *,
                       variant: str | None = None, dtype: str = "keep", force: bool = False, verify: bool = False,
                       allow_nonfinite: bool = False, image_size=None, progress: bool | None = None,
                       prefix: str | None = None, max_bytes: int | None = MAX_BYTES) -> ConversionReport:
    """Convert ``src`` (a path, or a published name or URL: :func:`mixer_convert.hub.resolve`) to
    ``dst``. ``to``: torch | timm | flax | npz | msgpack | orbax (default: from dst's suffix). The
    source is only read; dst is written atomically and never overwritten without ``force``; on
    any error no dst is left behind. Sources declaring more than ``max_bytes`` of tensors
    (default: 4x H/14) are refused unless it is None."""
    out = Output.plan(dst, to, force=force)  # before any reading or downloading: fail fast
    seen: list[str] = []
    params, cfg = open_checkpoint(src, variant, image_size, prefix, progress, max_bytes, dtype=dtype,
                                  allow_nonfinite=allow_nonfinite, warn=lambda msg: _warn_once(msg, seen),
                                  nonfinite_hint="pass --allow-nonfinite to convert anyway")
    with params:
        nbytes = sum(int(np.prod(s)) * params.dtypes[k].itemsize for k, s in params.shapes.items())
        report = ConversionReport(params.source, str(out.path), out.fmt, out.layout, cfg,
                                  sum(int(np.prod(s)) for s in params.shapes.values()), nbytes, warnings=seen)
        bar, step = _progress(nbytes, progress)
        with bar:
            # Verification runs on the temporary file, so a failed check leaves no dst behind.
            out.write(params, progress=step, source=Path(params.source), before_commit=(
                lambda tmp: verify_conversion(params, tmp, cfg, out.layout, report, allow_nonfinite=allow_nonfinite))
                if verify else None)
    return report


def _warn_once(msg: str, seen: list[str]) -> None:
    if msg not in seen:  # --verify reads each tensor a second time
        seen.append(msg)
        warnings.warn(msg)


def verify_conversion(source: Mapping[str, np.ndarray], dst: Path, cfg: MixerConfig, layout: str,
                      report: ConversionReport, batch: int = 2, allow_nonfinite: bool = False) -> None:
    """Read dst back (tensors must be bit-identical to what was written) and run the model
    of the destination's framework from dst against the float64 numpy reference on the
    source weights, on a random probe batch. Raises :class:`VerificationError` when the logits
    differ by more than the fp32 bound (scaled by their largest magnitude when that exceeds 1)
    or are not finite; only weights converted with ``allow_nonfinite`` that hold NaN/Inf may give
    non-finite logits (then the finite ones are compared)."""
    from mixer_convert import reference
    from mixer_convert.tools.parity import FP32_LOGITS_MAX_ABS

    back = read_params(dst, max_bytes=None)
    try:
        report.readback_exact = set(back) == set(source) and all(
            back.dtypes[k] == source.dtypes[k] and _same_bits(back[k], source[k]) for k in source)
        if not report.readback_exact:
            raise VerificationError(f"verification failed: {dst.name} does not read back bit-identical to the source")
        probe = np.random.default_rng(0).uniform(-1, 1, (batch, *cfg.image_size, cfg.in_chans)).astype(np.float32)
        with np.errstate(all="ignore"):  # overflow is judged below, not warned about
            ref = reference.forward(source, cfg, probe)
            got, report.verified_with = _framework_forward(back, cfg, layout, probe)
    finally:
        back.close()
    _judge_logits(got, ref, report, allow_nonfinite and bool(report.warnings), FP32_LOGITS_MAX_ABS)


def _judge_logits(got: np.ndarray, ref: np.ndarray, report: ConversionReport, nonfinite_weights: bool,
                  bound: float) -> None:
    finite_ref, finite_got = np.isfinite(ref), np.isfinite(got)
    with np.errstate(all="ignore"):
        scale = float(np.max(np.abs(ref[finite_ref]), initial=0.0))
        report.logits_tolerance = bound * max(1.0, scale)
        diff = np.abs(got.astype(np.float64) - ref)[finite_ref & finite_got]
    report.logits_max_abs = float(np.max(diff, initial=0.0)) if diff.size else float("nan")
    bad = int(np.count_nonzero(~(finite_ref & finite_got)))
    if bad and not nonfinite_weights:
        raise VerificationError(f"verification failed: {bad} of {got.size} probe logits are NaN or Inf "
                                f"({report.verified_with}); do the weights overflow float32?")
    report.logits_nonfinite = bad
    if report.logits_max_abs > report.logits_tolerance:
        raise VerificationError(f"verification failed: probe logits differ by {report.logits_max_abs:.3e}, more "
                                f"than the tolerance {report.logits_tolerance:.1e} ({report.verified_with})")


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.shape == b.shape and a.tobytes() == b.tobytes()


def _framework_forward(flat, cfg, layout, probe) -> tuple[np.ndarray, str]:
    import importlib.util

    flat32 = {k: np.asarray(flat[k], np.float32) for k in flat}
    if layout in ("torch", "timm") and importlib.util.find_spec("torch"):
        from mixer_convert.tools.parity import torch_forward
        return torch_forward(cfg, flat32, probe)["logits" if cfg.num_classes else "pre_logits"], \
            "our PyTorch model vs numpy float64 reference"
    if layout == "flax" and importlib.util.find_spec("flax"):
        from mixer_convert.tools.parity import flax_forward
        return flax_forward(cfg, flat32, probe)["logits" if cfg.num_classes else "pre_logits"], \
            "our Flax model vs numpy float64 reference"
    from mixer_convert import reference
    return reference.forward(flat32, cfg, probe), "numpy reference on the written file vs on the source"
