"""torch.hub entry points for the PyTorch MLP-Mixer.

    model = torch.hub.load("OWNER/REPO", "mixer_b16_224", pretrained=True)          # published weights
    model = torch.hub.load(CHECKOUT, "mixer", "B/16", num_classes=10, source="local")

The names are timm's; ``pretrained`` takes what ``mixer_torch.create_model`` takes: True (the
variant's default published file), a tag (``"imagenet21k"``, ``"sam"``, ...), a published name or
a checkpoint path in any format the bridge reads. Other keyword arguments are MixerConfig fields
(``num_classes``, ``image_size``, ``stoch_depth``, ...).
"""
import importlib.util as _importlib_util
import sys as _sys
from pathlib import Path as _Path

dependencies = ["torch", "numpy"]

_ROOT = _Path(__file__).resolve().parent


def _core_from_checkout() -> None:
    """Make ``mixer_convert`` this checkout's convert/ folder when no copy is imported yet.

    torch.hub puts the checkout on sys.path, which finds mixer_torch/ but not the core, whose
    folder (convert/) is named differently from the package. A mixer_convert already imported in
    this process is kept, and an installed copy of this same folder is imported as usual;
    otherwise the checkout's own core is used, so mixer_torch and its core come from one version.
    """
    if "mixer_convert" in _sys.modules:
        return
    folder = _ROOT / "convert"
    found = _importlib_util.find_spec("mixer_convert")
    if found is not None and found.origin and _Path(found.origin).resolve().parent == folder:
        return
    spec = _importlib_util.spec_from_file_location("mixer_convert", folder / "__init__.py",
                                                   submodule_search_locations=[str(folder)])
    module = _importlib_util.module_from_spec(spec)
    _sys.modules["mixer_convert"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del _sys.modules["mixer_convert"]
        raise


_core_from_checkout()

from mixer_convert.spec import TIMM_NAMES as _TIMM_NAMES, config_for as _config_for  # noqa: E402
from mixer_convert.spec import num_params as _num_params  # noqa: E402
from mixer_torch import MlpMixer as _MlpMixer  # noqa: E402
from mixer_torch import create_model as _create_model  # noqa: E402


def mixer(variant: str = "B/16", pretrained: "bool | str" = False, **kwargs) -> _MlpMixer:
    """Any variant (``"S/8"`` ... ``"H/14"``, or timm's name): ``mixer("B/16", num_classes=10)``."""
    return _create_model(variant, pretrained=pretrained, **kwargs)


def _entry(variant: str, name: str):
    def entry(pretrained: "bool | str" = False, **kwargs) -> _MlpMixer:
        return _create_model(variant, pretrained=pretrained, **kwargs)
    millions = _num_params(_config_for(variant)) / 1e6
    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"Mixer-{variant} at 224x224 ({millions:.1f} M parameters with the 1000-class head)."
    return entry


# timm's names (mixer_s32_224 ... mixer_l16_224), one entry point each, made from the spec's one list:
# torch.hub lists the module's public callables, so each is a module-level function of its own name.
globals().update({name: _entry(variant, name) for variant, name in _TIMM_NAMES.items()})
