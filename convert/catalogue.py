"""The published Mixer checkpoints and their names: which files Google released, how each may be
named (``B/16-i21k``, big_vision's ``B-i21k/16``, ``gs://mixer_models/...``, its https URL, timm's
names), and which file ``create_model(variant, pretrained=...)`` means. Names only: fetching and
the cache are :mod:`mixer_convert.hub`'s.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterator

from mixer_convert.spec import TIMM_NAMES, parse_variant

DEFAULT_BASE_URL = "https://storage.googleapis.com/mixer_models"
BUCKET = "gs://mixer_models"
HF_PREFIX = "hf-hub:"
# Bucket folder -> the tag used in short names; also accepted as create_model(pretrained=...).
TAGS: dict[str, str] = {"imagenet21k": "i21k", "imagenet1k": "i1k", "sam": "sam", "gsam": "gsam"}
# pretrained=True picks, per variant, the first of these that was published (a 1000-class
# ImageNet classifier where one exists).
DEFAULT_ORDER = ("imagenet1k", "gsam", "sam", "imagenet21k")


@dataclasses.dataclass(frozen=True)
class Published:
    """One released file. ``path`` is the bucket path exactly as listed (the gsam files have no
    ``.npz`` suffix); ``mib`` is the size in Google's ``gsutil ls -lh`` listing."""

    path: str
    variant: str
    num_classes: int
    mib: float

    @property
    def folder(self) -> str:
        return self.path.split("/")[0]

    @property
    def name(self) -> str:
        return f"{self.variant}-{TAGS[self.folder]}"

    @property
    def big_vision_name(self) -> str:
        size, patch = self.variant.split("/")
        return f"{size}-{TAGS[self.folder]}/{patch}"

    @property
    def gs_url(self) -> str:
        return f"{BUCKET}/{self.path}"

# Every released file, from Google's own listing of the bucket (gsutil ls -lh).
CATALOGUE: tuple[Published, ...] = (
    Published("imagenet21k/Mixer-B_16.npz", "B/16", 21843, 289.61),
    Published("imagenet21k/Mixer-L_16.npz", "L/16", 21843, 875.78),
    Published("imagenet1k/Mixer-B_16.npz", "B/16", 1000, 228.47),
    Published("imagenet1k/Mixer-L_16.npz", "L/16", 1000, 794.29),
    Published("sam/Mixer-B_16.npz", "B/16", 1000, 228.47),
    Published("sam/Mixer-B_32.npz", "B/32", 1000, 230.04),
    Published("gsam/Mixer-B_16", "B/16", 1000, 228.47),
    Published("gsam/Mixer-B_32", "B/32", 1000, 230.04),
    Published("gsam/Mixer-S_16", "S/16", 1000, 70.71),
    Published("gsam/Mixer-S_32", "S/32", 1000, 72.91),
    Published("gsam/Mixer-S_8", "S/8", 1000, 78.79),
)


# --------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------


def _spellings(e: Published, extra_urls: tuple[str, ...]) -> Iterator[str]:
    stem = e.path[:-4] if e.path.endswith(".npz") else e.path
    yield e.name
    yield e.big_vision_name
    for url in (BUCKET, DEFAULT_BASE_URL, *extra_urls):
        yield f"{url}/{stem}"
        yield f"{url}/{stem}.npz"


def lookup(source: str, mirror: str | None = None) -> Published | None:
    """The catalogue entry a name or URL denotes (case-insensitive; ``mirror``: one more base URL
    that names the bucket), or None."""
    key = source.strip().lower()
    for e in CATALOGUE:
        if any(key == s.lower() for s in _spellings(e, (mirror,) if mirror else ())):
            return e
    return None


def bucket_path_entry(source: str) -> Published | None:
    """A bare bucket path ('imagenet21k/Mixer-B_16.npz'): not downloaded (it may be a mistyped
    local path), but named in the error so the user can ask for it explicitly."""
    key = source.strip().lower().removesuffix(".npz")
    return next((e for e in CATALOGUE if e.path.lower().removesuffix(".npz") == key), None)


def published_for(variant: str, tag: str | None = None) -> Published:
    """The catalogue file for a variant and a tag (a bucket folder, its short form, or None for
    the default: see :data:`DEFAULT_ORDER`)."""
    size, patch = parse_variant(variant)
    variant = f"{size}/{patch}"
    have = [e for e in CATALOGUE if e.variant == variant]
    if tag is None:
        for folder in DEFAULT_ORDER:
            for e in have:
                if e.folder == folder:
                    return e
    else:
        folder = {**{f: f for f in TAGS}, **{t: f for f, t in TAGS.items()}}.get(tag.lower())
        for e in have:
            if e.folder == folder:
                return e
    if not have:
        raise ValueError(f"no published checkpoint for {variant}; published: "
                         f"{', '.join(sorted({e.variant for e in CATALOGUE}))} (mixer-convert --list)")
    raise ValueError(f"no published {variant} checkpoint tagged {tag!r}; {variant} has "
                     f"{', '.join(TAGS[e.folder] for e in have)} (e.g. {have[0].name})")


def _split_model_name(name: str) -> tuple[str, str | None] | None:
    """'B/16', 'Mixer-B_16', 'mixer_b16_224', 'mixer_b16_224.goog_in21k' -> (variant, timm tag);
    None if ``name`` names no variant."""
    base, _, tag = name.partition(".") if name.lower().startswith("mixer_") else (name, "", "")
    try:
        size, patch = parse_variant(base)
    except ValueError:
        return None
    return f"{size}/{patch}", tag or None


def pretrained_source(model: str, pretrained: bool | str = True) -> tuple[str, str | None]:
    """What ``create_model(model, pretrained=...)`` and ``from_pretrained(model, pretrained)``
    load: (source for :func:`resolve`, the variant the weights must be, or None).

    ``model`` is a variant (``B/16``, timm's ``mixer_b16_224``) or any source (path, URL,
    catalogue or hf-hub name). For a variant, ``pretrained`` is True (the default file of
    :data:`DEFAULT_ORDER`), a tag (``imagenet21k``/``i21k``, ``imagenet1k``/``i1k``, ``sam``,
    ``gsam``) or a source whose weights must be that variant. A timm name with a pretrained tag
    (``mixer_b16_224.goog_in21k``) is timm's copy on the Hugging Face hub.
    """
    if pretrained is False or pretrained is None:
        raise ValueError("pretrained must be True, a tag or a checkpoint source")
    # An existing local path is the source even when named like a variant: a timm model folder
    # downloaded as mixer_b16_224.goog_in21k_ft_in1k/ must not send us to the network.
    parsed = None if os.path.exists(os.path.expanduser(model)) else _split_model_name(model)
    if parsed is None:  # model is itself the source
        if pretrained is not True:
            raise ValueError(f"pretrained={pretrained!r} needs a variant name (e.g. 'B/16'), not {model!r}")
        return model, None
    variant, timm_tag = parsed
    if timm_tag is not None:
        if pretrained is not True:
            raise ValueError(f"{model!r} already names its weights; pass pretrained=True")
        if variant not in TIMM_NAMES:
            raise ValueError(f"timm has no {variant} model")
        return f"{HF_PREFIX}timm/{TIMM_NAMES[variant]}.{timm_tag}", variant
    if pretrained is True:
        return published_for(variant).name, variant
    if isinstance(pretrained, str) and pretrained.lower() in {**TAGS, **{t: t for t in TAGS.values()}}:
        return published_for(variant, pretrained).name, variant
    return os.fspath(pretrained), variant
