"""Checkpoint files the loaders' tests share: a non-square architecture, and bfloat16 .npz files
written the way big_vision writes them."""
import numpy as np

from mixer_convert import config_for, random_params

# 32x48 with 4x4 patches: 96 tokens, which no square grid gives.
NON_SQUARE = config_for("S/16", patch_size=4, image_size=(32, 48), hidden_dim=16, num_blocks=2, tokens_mlp_dim=8,
                        channels_mlp_dim=24, num_classes=3)


def bf16_npz(path, cfg, seed: int = 4) -> dict[str, np.ndarray]:
    """``np.savez`` of bfloat16 arrays, as big_vision saves them (numpy writes each as the void
    type 'V2'); returns the values the file holds, as float32."""
    import ml_dtypes

    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in random_params(cfg, seed).items()}
    np.savez(path, **bf16)
    with np.load(path) as z:
        assert {z[k].dtype for k in z.files} == {np.dtype("V2")}
    return {k: v.astype(np.float32) for k, v in bf16.items()}
