"""Run the Flax (Linen and NNX) and the PyTorch model on the same weights and inputs and compare
every intermediate. Imports each framework only when its side is run.

Used by the test suite and by the parity report; a failure names the first block whose
output diverges, not just the logits.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Mapping

import numpy as np

from mixer_convert.spec import MixerConfig, intermediate_names

# The agreement bounds, used by the tests, mixer-parity and mixer-demo alike.
# fp32: the bound on logits, and a relative bound on every intermediate.
FP32_LOGITS_MAX_ABS, FP32_REL = 1e-4, 1e-5
# bf16 has an 8-bit mantissa (one rounding = 3.9e-3 relative); errors compound over blocks, so
# both sides must stay within 5e-2 of each other and of the fp32 reference, measured relative
# to each intermediate's largest magnitude. Observed: 3.1e-2 at worst (H/14 at 224).
BF16_REL = 5e-2
# Gradients: max-abs <= GRAD_RTOL x that parameter's largest gradient + GRAD_ATOL_GLOBAL x the
# largest gradient of any parameter (see convert/tools/parity_report.py for why the second term).
GRAD_RTOL, GRAD_ATOL_GLOBAL = 1e-4, 1e-6


def timm_python() -> str | None:
    """An interpreter that has timm: $MIXER_TIMM_PYTHON, else this one if timm imports here.
    (timm needs torchvision, which cannot share the CPU torch wheel; see README.)"""
    import importlib.util
    import os
    import sys

    exe = os.environ.get("MIXER_TIMM_PYTHON")
    if exe:
        return exe
    return sys.executable if importlib.util.find_spec("timm") else None


def torch_device(device: str | None = None) -> str:
    """'cuda' when a GPU is visible to PyTorch, else 'cpu' (or what the caller asks for)."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device == "gpu" else device


def flax_forward(cfg: MixerConfig, flat: Mapping[str, np.ndarray], images_nhwc: np.ndarray,
                 dtype: str = "float32") -> dict[str, np.ndarray]:
    """All intermediates of the Flax model, as float32 numpy. fp32 matmuls run at full
    precision (no TF32/bf16 passes on GPU/TPU) so the comparison measures the models."""
    import jax
    import jax.numpy as jnp

    from mixer_jax.model import MlpMixer, params_from_flat

    model = MlpMixer(cfg, dtype=jnp.dtype(dtype))
    params = params_from_flat(flat, cfg)
    precision = jax.default_matmul_precision("highest") if dtype == "float32" else contextlib.nullcontext()
    with precision:
        _, inter = jax.jit(lambda p, x: model.apply({"params": p}, x, return_intermediates=True))(
            params, jnp.asarray(images_nhwc))
    return {k: np.asarray(v, dtype=np.float32) for k, v in inter.items()}


def nnx_forward(cfg: MixerConfig, flat: Mapping[str, np.ndarray], images_nhwc: np.ndarray,
                dtype: str = "float32") -> dict[str, np.ndarray]:
    """All intermediates of the Flax NNX model (eval mode, under ``nnx.jit``), as float32 numpy;
    the same precision setting as :func:`flax_forward`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mixer_jax.nnx import from_flat

    model = from_flat(flat, cfg, dtype=jnp.dtype(dtype))
    model.eval()
    precision = jax.default_matmul_precision("highest") if dtype == "float32" else contextlib.nullcontext()
    with precision:
        _, inter = nnx.jit(lambda m, x: m(x, return_intermediates=True))(model, jnp.asarray(images_nhwc))
    return {k: np.asarray(v, dtype=np.float32) for k, v in inter.items()}


@contextlib.contextmanager
def _no_tf32():
    """fp32 matmuls and convolutions at full precision on CUDA for the duration (restored after)."""
    import torch

    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def torch_forward(cfg: MixerConfig, flat: Mapping[str, np.ndarray], images_nhwc: np.ndarray,
                  dtype: str = "float32", device: str | None = None) -> dict[str, np.ndarray]:
    """All intermediates of the PyTorch model (eval mode), as float32 numpy."""
    import torch

    from mixer_torch.model import model_from_flat

    dev = torch_device(device)
    tdtype = getattr(torch, dtype)
    # built without a random initialisation (minutes for L and H on a CPU: torch's RNG is serial)
    model = model_from_flat(flat, cfg).eval().to(device=dev, dtype=tdtype)
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))).to(device=dev, dtype=tdtype)
    with _no_tf32(), torch.no_grad():
        _, inter = model(x, return_intermediates=True)
    return {k: v.float().cpu().numpy() for k, v in inter.items()}


@dataclasses.dataclass
class Diff:
    name: str
    max_abs: float
    scale: float  # max |reference|

    @property
    def rel(self) -> float:
        """max-abs error relative to the reference's largest magnitude."""
        return self.max_abs / max(self.scale, 1e-12)


def compare(ref: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray], cfg: MixerConfig) -> list[Diff]:
    rows = []
    for name in intermediate_names(cfg):
        a, b = ref[name], other[name]
        if a.shape != b.shape:
            raise ValueError(f"{name}: shapes differ, {a.shape} vs {b.shape}")
        rows.append(Diff(name, float(np.max(np.abs(a - b))), float(np.max(np.abs(a)))))
    return rows


def first_divergence(rows: list[Diff], rel_tol: float) -> Diff | None:
    """The first intermediate (in model order) whose relative error exceeds ``rel_tol``."""
    return next((r for r in rows if r.rel > rel_tol), None)


def format_table(rows: list[Diff]) -> str:
    lines = [f"{'output':<22}{'max-abs':>12}{'rel':>12}{'max|ref|':>12}"]
    lines += [f"{r.name:<22}{r.max_abs:>12.3e}{r.rel:>12.3e}{r.scale:>12.3e}" for r in rows]
    return "\n".join(lines)


# ---- gradients ------------------------------------------------------------------------------


def flax_grads(cfg: MixerConfig, flat: Mapping[str, np.ndarray], images_nhwc: np.ndarray,
               labels: np.ndarray) -> dict[str, np.ndarray]:
    """d(mean softmax cross-entropy)/d(every parameter), canonical names, fp32 at full precision."""
    import jax
    import jax.numpy as jnp
    import optax

    from mixer_jax.model import MlpMixer, params_from_flat, params_to_flat

    model = MlpMixer(cfg)

    def loss(p, x, y):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    with jax.default_matmul_precision("highest"):
        g = jax.jit(jax.grad(loss))(params_from_flat(flat, cfg), jnp.asarray(images_nhwc), jnp.asarray(labels))
    return params_to_flat(g)


def nnx_grads(cfg: MixerConfig, flat: Mapping[str, np.ndarray], images_nhwc: np.ndarray,
              labels: np.ndarray) -> dict[str, np.ndarray]:
    """The same gradients from the Flax NNX model (``nnx.grad`` under ``nnx.jit``), canonical names."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from mixer_jax.nnx import from_flat, state_to_flat

    def loss(model, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    model = from_flat(flat, cfg)
    model.eval()
    with jax.default_matmul_precision("highest"):
        g = nnx.jit(nnx.grad(loss))(model, jnp.asarray(images_nhwc), jnp.asarray(labels))
    return state_to_flat(g)


def torch_grads(cfg: MixerConfig, flat: Mapping[str, np.ndarray], images_nhwc: np.ndarray, labels: np.ndarray,
                device: str | None = None) -> dict[str, np.ndarray]:
    """The same gradients from the PyTorch model, mapped back to canonical names and layouts."""
    import torch

    from mixer_convert.layouts import torch_to_canonical
    from mixer_torch.model import model_from_flat

    dev = torch_device(device)
    model = model_from_flat(flat, cfg).eval().to(dev)
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))).to(dev)
    with _no_tf32():
        torch.nn.functional.cross_entropy(model(x), torch.from_numpy(labels).long().to(dev)).backward()
    return torch_to_canonical({k: p.grad.detach().cpu().numpy() for k, p in model.named_parameters()}, cfg)


def compare_params(ref: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray]) -> list[Diff]:
    """Per-parameter error, in canonical order (``scale`` is the reference's largest magnitude)."""
    return [Diff(k, float(np.max(np.abs(ref[k] - other[k]))), float(np.max(np.abs(ref[k])))) for k in ref]
