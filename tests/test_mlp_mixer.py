"""mixer_torch.mlp_mixer: the original port's constructor (MLP_Mixer) keeps its arguments'
meanings, and ``python -m mixer_torch.mlp_mixer`` prints logits as the original script did."""
import subprocess
import sys

import pytest

from conftest import ROOT, requires_torch, subprocess_env

pytestmark = requires_torch


@requires_torch
@pytest.mark.slow
def test_compat_constructor_keeps_the_original_ports_argument_meanings():
    import torch
    from mixer_torch import MLP_Mixer

    m = MLP_Mixer()  # original defaults: 224x224x3, patch 16, 10 classes, 8 mixers, 512 features
    c = m.config
    assert (c.image_size, c.in_chans, c.patch_size, c.num_classes) == ((224, 224), 3, (16, 16), 10)
    assert (c.num_blocks, c.hidden_dim) == (8, 512)
    assert c.tokens_mlp_dim == int(4 * 196) and c.channels_mlp_dim == int(0.5 * 512)
    assert c.dropout_rate == 0.5
    m2 = MLP_Mixer(image_shape=(64, 32, 1), patch_size=8, num_classes=3, num_mixers=2, num_features=16,
                   expansion_token=0.5, expansion_channel=2, dropout=0.0)
    assert (m2.config.tokens_mlp_dim, m2.config.channels_mlp_dim, m2.config.in_chans) == (16, 32, 1)
    x = torch.randn(4, 1, 64, 32)
    torch.nn.init.normal_(m2.head.weight)
    assert m2.eval()(x).shape == (4, 3)
    with pytest.raises(ValueError, match="not divisible"):
        MLP_Mixer(image_shape=(30, 30, 3), patch_size=16)


@requires_torch
@pytest.mark.slow
def test_module_entry_point_prints_logits_for_a_random_image_like_the_original_script():
    r = subprocess.run([sys.executable, "-m", "mixer_torch.mlp_mixer"], cwd=ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "logits (1, 10)" in r.stdout and "tensor([[" in r.stdout
    assert "RuntimeWarning" not in r.stderr


def test_compat_constructor_builds_the_mixer_its_arguments_describe():
    import torch
    from mixer_torch import MLP_Mixer

    m = MLP_Mixer(image_shape=(32, 16, 1), patch_size=8, num_classes=4, num_mixers=1, num_features=8,
                  expansion_token=2, expansion_channel=0.5, dropout=0.0)
    c = m.config
    assert (c.image_size, c.in_chans, c.patch_size, c.num_classes) == ((32, 16), 1, (8, 8), 4)
    assert (c.num_blocks, c.hidden_dim, c.tokens_mlp_dim, c.channels_mlp_dim) == (1, 8, 16, 4)
    torch.nn.init.normal_(m.head.weight)
    assert m.eval()(torch.randn(3, 1, 32, 16)).shape == (3, 4)
    with pytest.raises(ValueError, match="not divisible"):
        MLP_Mixer(image_shape=(30, 30, 3), patch_size=16, num_mixers=1, num_features=8)
