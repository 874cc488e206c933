"""Lets a benchmark script import this checkout's packages from an interpreter where the toolkit
is not installed (the timm oracle's): the folder convert/ is the package mixer_convert."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if importlib.util.find_spec("mixer_convert") is None:
    spec = importlib.util.spec_from_file_location("mixer_convert", ROOT / "convert" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "convert")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["mixer_convert"] = module
    spec.loader.exec_module(module)
