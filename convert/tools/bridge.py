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
from pathlib import Path

import numpy as np

from mixer_convert.formats.timm_hub import PREPROCESSING, timm_name
from mixer_convert.load import open_checkpoint
from mixer_convert.params import NonFiniteWeightsError
from mixer_convert.save import Output
from mixer_convert.source import MAX_BYTES
from mixer_convert.spec import MixerConfig
from mixer_convert.tools.verify import Verification, VerificationError, verify_conversion

__all__ = ["ConversionReport", "NonFiniteWeightsError", "VerificationError", "convert_checkpoint", "verify_conversion"]


@dataclasses.dataclass
class ConversionReport:
    src: str
    dst: str
    fmt: str
    layout: str
    config: MixerConfig
    num_params: int
    nbytes: int
    verification: Verification | None = None  # with --verify
    warnings: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        lines = [f"{self.src} -> {self.dst} ({self.fmt}, {self.layout} naming)",
                 f"  model: {self.config}", f"  {self.num_params:,} parameters, {self.nbytes / 2**20:.1f} MiB"]
        if self.verification is not None:
            lines.append(self.verification.summary())
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
                       prefix: str | None = None, max_bytes: int | None = MAX_BYTES,
                       preprocess: str | None = None) -> ConversionReport:
    """Convert ``src`` (a path, or a published name or URL: :func:`mixer_convert.hub.resolve`) to
    ``dst``. ``to``: torch | timm | flax | nnx | npz | msgpack | orbax | timm-hub (default: from dst's
    suffix). The source is only read; dst is written atomically and never overwritten without
    ``force``; on any error no dst is left behind. Sources declaring more than ``max_bytes`` of
    tensors (default: 4x H/14) are refused unless it is None.

    timm-hub (a timm / Hugging Face model folder) is always verified, because its model card
    reports the measured logit differences; ``preprocess`` (vit_jax, the default, or big_vision)
    picks the eval preprocessing its config.json asks timm for."""
    out = Output.plan(dst, to, force=force)  # before any reading or downloading: fail fast
    hub = out.fmt == "timm-hub"
    if preprocess is not None and not hub:
        raise ValueError("preprocess (--preprocess) is only for timm model folders (--to timm-hub)")
    options = {"preprocess": preprocess or "vit_jax"} if hub else None
    if hub and options["preprocess"] not in PREPROCESSING:
        raise ValueError(f"unknown preprocessing {preprocess!r}; expected one of {', '.join(PREPROCESSING)}")
    seen: list[str] = []
    params, cfg = open_checkpoint(src, variant, image_size, prefix, progress, max_bytes, dtype=dtype,
                                  allow_nonfinite=allow_nonfinite, warn=lambda msg: _warn_once(msg, seen),
                                  nonfinite_hint="pass --allow-nonfinite to convert anyway")
    with params:
        if hub:
            timm_name(cfg)  # a model timm does not have: refused before any data is read or written
        dtypes = params.dtypes
        nbytes = sum(int(np.prod(s)) * dtypes[k].itemsize for k, s in params.shapes.items())
        report = ConversionReport(params.source, str(out.path), out.fmt, out.layout, cfg,
                                  sum(int(np.prod(s)) for s in params.shapes.values()), nbytes, warnings=seen)
        bar, step = _progress(nbytes, progress)
        def check(tmp: Path) -> None:  # on the temporary file: a failed check leaves no dst behind
            report.verification = verify_conversion(params, tmp, cfg, out.layout, nonfinite_weights=bool(seen),
                                                    exact_gelu=hub)
            if hub:
                from mixer_convert.tools.model_card import write_card
                write_card(tmp, cfg, os.fspath(src), options["preprocess"], report.verification,
                           {np.dtype(d).name for d in params.dtypes.values()})

        with bar:
            out.write(params, progress=step, source=Path(params.source),
                      before_commit=check if verify or hub else None, format_options=options)
    return report


def _warn_once(msg: str, seen: list[str]) -> None:
    if msg not in seen:  # --verify reads each tensor a second time
        seen.append(msg)
        warnings.warn(msg)
