"""The model card (README.md) of a timm model folder written by ``mixer-convert --to timm-hub``:
where the weights come from, their license, the eval preprocessing ``config.json`` asks timm for,
and the logit differences measured when the folder was written -- only measured numbers.

The layout follows timm's ``generate_readme`` (YAML front matter the Hugging Face hub reads, then
Markdown sections).
"""
from __future__ import annotations

import os
from pathlib import Path

from mixer_convert.catalogue import HF_PREFIX, lookup
from mixer_convert.formats.timm_hub import PREPROCESSING, timm_name
from mixer_convert.hub import base_url
from mixer_convert.spec import MixerConfig, num_params, variant_name
from mixer_convert.tools.verify import Verification

CARD = "README.md"
PAPER = 'Tolstikhin et al., 2021, "MLP-Mixer: An all-MLP Architecture for Vision", arXiv:2105.01601'

# What config.json's eval preprocessing does and how it differs from the official pipeline's; its
# fields are filled in from formats.timm_hub.PREPROCESSING, what config.json says.
_SCALING = "then (x - 127.5) / 127.5 (`mean = std = 0.5` on pixels scaled to [0, 1])"
PIPELINE_TEXT = {
    "vit_jax": (
        "vision_transformer's eval preprocessing (the paper's fine-tuning results): the whole image resized to "
        "224x224 without keeping its aspect ratio (`crop_mode: {crop_mode}`, `crop_pct: {crop_pct}`), "
        "{interpolation}, {scaling}. The official pipeline resizes with `tf.image.resize`, which does not "
        "antialias; timm resizes with Pillow / torchvision, which antialias when shrinking, so the pixels timm "
        "feeds the model differ somewhat from the official ones for images larger than 224x224."),
    "big_vision": (
        "big_vision's ImageNet eval preprocessing (the paper's ImageNet tables): shorter side resized to 256, "
        "central 224x224 crop (`crop_pct: {crop_pct}`, `crop_mode: {crop_mode}`), {scaling}. big_vision resizes "
        "with area resampling (`tf.image.resize(method=\"area\")`), which timm does not offer; `{interpolation}` "
        "(timm's own default for its Mixers) stands in for it, so the pixels timm feeds the model differ slightly "
        "from the official ones."),
}


def describe_source(source: str) -> tuple[str, bool]:
    """(how the card names the source, whether it is one of Google's published files)."""
    if not os.path.exists(os.path.expanduser(source)):
        entry = lookup(source, base_url())
        if entry is not None:
            return f"Google's published checkpoint `{entry.name}` (`{entry.gs_url}`)", True
        if source.startswith(HF_PREFIX):
            return f"the Hugging Face hub checkpoint `{source}`", False
    return f"the file `{source}`", False


FRONT_MATTER = ["---", "tags:", "- image-classification", "- timm", "- mlp-mixer", "library_name: timm",
                "license: apache-2.0", "pipeline_tag: image-classification", "---"]
USAGE = ["## Usage", "```python", "import timm", "",
         'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True).eval()',
         "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))", "```",
         "mixer-toolkit reads the folder as well: `mixer_torch.from_checkpoint(DIR)`, "
         "`mixer_jax.from_checkpoint(DIR)`, `mixer-convert DIR out.npz`.", ""]
CITATION = ["## Citation", "```bibtex", "@article{tolstikhin2021mixer,",
            "  title={MLP-Mixer: An all-MLP Architecture for Vision},",
            "  author={Tolstikhin, Ilya and Houlsby, Neil and Kolesnikov, Alexander and Beyer, Lucas and Zhai, "
            "Xiaohua and Unterthiner, Thomas and Yung, Jessica and Steiner, Andreas and Keysers, Daniel and "
            "Uszkoreit, Jakob and Lucic, Mario and Dosovitskiy, Alexey},",
            "  journal={arXiv preprint arXiv:2105.01601},", "  year={2021}", "}", "```", ""]


def _details(cfg: MixerConfig, source: str, dtypes: set[str]) -> list[str]:
    name, variant = timm_name(cfg), variant_name(cfg)
    where, google = describe_source(source)
    license_note = ("Apache-2.0, the license of Google's released Mixer weights" if google else
                    "Apache-2.0 is what Google's released Mixer weights carry; these were converted from a source "
                    "whose origin the converter cannot check: change `license` here and in config.json if they "
                    "do not derive from Google's weights")
    classes = f"{cfg.num_classes}" if cfg.num_classes else "none: the model returns pre-logits (`num_classes: 0`)"
    return [f"# Model card for {name}", "",
            f"MLP-Mixer {variant} ({PAPER}) as a timm model folder, converted by `mixer-convert --to timm-hub` "
            f"(mixer-toolkit) from {where}.", "",
            "## Model details",
            f"- **Model:** timm `{name}`: {cfg.num_blocks} Mixer blocks, hidden size {cfg.hidden_dim}, "
            f"{cfg.patch_size[0]}x{cfg.patch_size[1]} patches, 224x224 RGB input",
            f"- **Parameters:** {num_params(cfg):,} ({', '.join(sorted(dtypes))})",
            f"- **Classes:** {classes}",
            f"- **Source checkpoint:** {where}",
            f"- **License:** {license_note}", ""]


def _preprocessing(preprocess: str) -> list[str]:
    pipeline = PIPELINE_TEXT[preprocess].format(scaling=_SCALING, **PREPROCESSING[preprocess])
    return ["## Preprocessing", f"`config.json` asks timm for {pipeline} The official function, exactly: "
            f'`mixer_convert.preprocess.load_image(path, "{preprocess}")`.', ""]


def _check(v: Verification) -> list[str]:
    """Only what ``v`` measured."""
    gelu = "- timm's Mixers use the exact (erf) GELU where the official model uses the tanh approximation."
    if v.exact_gelu_max_abs is not None:
        gelu += (f" On the same probe the exact-GELU function (float64 numpy) differs from the official one by "
                 f"{v.exact_gelu_max_abs:.2e} in the logits (max-abs); timm itself was not run at conversion.")
    gelu += (" Switching timm's `nn.GELU` modules to `approximate=\"tanh\"` gives the official function "
             "(mixer-toolkit's tests require agreement within 1e-4).")
    return ["## Conversion check (measured when this folder was written)",
            "- Probe: --verify's batch of 2 random 224x224 images with values uniform in [-1, 1] (seed 0), not "
            "real images.",
            f"- Weights read back from this folder: {'bit-identical' if v.readback_exact else 'DIFFERENT'} "
            "to the converted source.",
            f"- {v.verified_with[:1].upper() + v.verified_with[1:]}: logits max-abs difference "
            f"{v.logits_max_abs:.2e} (tolerance {v.logits_tolerance:.1e})"
            + (f"; {v.logits_nonfinite} logits NaN/Inf (the weights hold NaN/Inf)" if v.logits_nonfinite else "")
            + ".", gelu, ""]


def card_text(cfg: MixerConfig, source: str, preprocess: str, verification: Verification,
              dtypes: set[str]) -> str:
    """The card's Markdown; the figures are ``verification``'s (measured with ``exact_gelu``)."""
    return "\n".join(FRONT_MATTER + _details(cfg, source, dtypes) + USAGE + _preprocessing(preprocess)
                     + _check(verification) + CITATION)


def write_card(folder: Path, cfg: MixerConfig, source: str, preprocess: str, verification: Verification,
               dtypes: set[str]) -> None:
    """README.md in a (temporary) timm model folder, once ``verification`` measured it; ``source``
    as the user named it, ``dtypes`` those of the written weights."""
    if preprocess not in PREPROCESSING:
        raise ValueError(f"unknown preprocessing {preprocess!r}; expected one of {', '.join(PREPROCESSING)}")
    (folder / CARD).write_text(card_text(cfg, source, preprocess, verification, dtypes), encoding="utf-8")
