"""``--verify``: a written checkpoint read back bit-identical to what was written, and the
destination framework's model on it agreeing with a float64 numpy reference on the source."""
from __future__ import annotations

import dataclasses

from collections.abc import Mapping
from pathlib import Path
import numpy as np

from mixer_convert.errors import CheckpointError, importable
from mixer_convert.load import read_params
from mixer_convert.spec import MixerConfig


class VerificationError(CheckpointError):
    """--verify found the written file wrong; nothing was written."""


@dataclasses.dataclass
class Verification:
    readback_exact: bool = False
    logits_max_abs: float = float("nan")
    logits_tolerance: float = float("nan")
    logits_nonfinite: int = 0
    verified_with: str = ""
    # With exact_gelu: how far timm's function (exact GELU) is from the official one (tanh GELU) on
    # the same probe, both float64 numpy on the source weights; None when not measured.
    exact_gelu_max_abs: float | None = None

    def summary(self) -> str:
        return (f"  read back: {'bit-identical' if self.readback_exact else 'DIFFERENT'}\n"
                f"  probe logits max-abs difference ({self.verified_with}): {self.logits_max_abs:.3e} "
                f"(tolerance {self.logits_tolerance:.1e})"
                + (f"; {self.logits_nonfinite} logits NaN/Inf (allowed)" if self.logits_nonfinite else "")
                + (f"\n  exact-GELU (timm's) vs tanh-GELU (official) function, float64: {self.exact_gelu_max_abs:.3e}"
                   if self.exact_gelu_max_abs is not None else ""))


def verify_conversion(source: Mapping[str, np.ndarray], dst: Path, cfg: MixerConfig, layout: str,
                      batch: int = 2, nonfinite_weights: bool = False, exact_gelu: bool = False) -> Verification:
    """Read dst back (tensors must be bit-identical to what was written) and run the model
    of the destination's framework from dst against the float64 numpy reference on the
    source weights, on a random probe batch. Raises :class:`VerificationError` when the logits
    differ by more than the fp32 bound (scaled by their largest magnitude when that exceeds 1)
    or are not finite; only weights holding NaN/Inf (converted on purpose: ``nonfinite_weights``)
    may give non-finite logits (then the finite ones are compared). ``exact_gelu`` also measures
    :attr:`Verification.exact_gelu_max_abs` (for outputs that timm, which uses exact GELU, will run)."""
    from mixer_convert import reference
    from mixer_convert.tools.parity import FP32_LOGITS_MAX_ABS

    result = Verification()
    with read_params(dst, max_bytes=None) as back:
        result.readback_exact = set(back) == set(source) and all(
            back.dtypes[k] == source.dtypes[k] and _same_bits(back[k], source[k]) for k in source)
        if not result.readback_exact:
            raise VerificationError(f"verification failed: {dst.name} does not read back bit-identical to the source")
        probe = probe_images(cfg, batch)
        with np.errstate(all="ignore"):  # overflow is judged below, not warned about
            ref = reference.forward(source, cfg, probe)
            got, result.verified_with = _framework_forward(back, cfg, layout, probe)
            if exact_gelu:
                result.exact_gelu_max_abs = _max_abs_finite(reference.forward(source, cfg, probe, gelu="erf") - ref)
    _judge_logits(got, ref, result, nonfinite_weights, FP32_LOGITS_MAX_ABS)
    return result


def probe_images(cfg: MixerConfig, batch: int = 2) -> np.ndarray:
    """The probe batch --verify runs: ``batch`` random NHWC images uniform in [-1, 1] (seed 0)."""
    return np.random.default_rng(0).uniform(-1, 1, (batch, *cfg.image_size, cfg.in_chans)).astype(np.float32)


def _judge_logits(got: np.ndarray, ref: np.ndarray, result: Verification, nonfinite_weights: bool,
                  bound: float) -> None:
    finite_ref, finite_got = np.isfinite(ref), np.isfinite(got)
    with np.errstate(all="ignore"):
        scale = float(np.max(np.abs(ref[finite_ref]), initial=0.0))
        result.logits_tolerance = bound * max(1.0, scale)
        diff = np.abs(got.astype(np.float64) - ref)[finite_ref & finite_got]
    result.logits_max_abs = float(np.max(diff, initial=0.0)) if diff.size else float("nan")
    bad = int(np.count_nonzero(~(finite_ref & finite_got)))
    if bad and not nonfinite_weights:
        raise VerificationError(f"verification failed: {bad} of {got.size} probe logits are NaN or Inf "
                                f"({result.verified_with}); do the weights overflow float32?")
    result.logits_nonfinite = bad
    if result.logits_max_abs > result.logits_tolerance:
        raise VerificationError(f"verification failed: probe logits differ by {result.logits_max_abs:.3e}, more "
                                f"than the tolerance {result.logits_tolerance:.1e} ({result.verified_with})")


def _max_abs_finite(diff: np.ndarray) -> float:
    finite = np.abs(diff[np.isfinite(diff)])
    return float(finite.max()) if finite.size else float("nan")


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.shape == b.shape and a.tobytes() == b.tobytes()


# The model --verify runs for each output naming: (the framework it needs, parity's forward, what it is).
_MODELS = {"torch": ("torch", "torch_forward", "our PyTorch model"),
           "timm": ("torch", "torch_forward", "our PyTorch model"),
           "nnx": ("flax", "nnx_forward", "our Flax NNX model"),
           "flax": ("flax", "flax_forward", "our Flax model")}


def _framework_forward(flat, cfg, layout, probe) -> tuple[np.ndarray, str]:
    """The logits (pre-logits without a head) of the destination framework's model on ``flat``; the
    numpy reference where that framework is not installed."""
    flat32 = {k: np.asarray(flat[k], np.float32) for k in flat}
    framework, forward, what = _MODELS[layout]
    if importable(framework):
        from mixer_convert.tools import parity
        out = getattr(parity, forward)(cfg, flat32, probe)
        return out["logits" if cfg.num_classes else "pre_logits"], f"{what} vs numpy float64 reference"
    from mixer_convert import reference
    return reference.forward(flat32, cfg, probe), "numpy reference on the written file vs on the source"
