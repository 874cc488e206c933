"""The framework-neutral spec and the checkpoint bridge. Importing this package imports
neither JAX nor PyTorch; each format module imports its framework only when used."""
from mixer_convert.params import ParamMismatchError, check_params, check_variant, infer_config, random_params
from mixer_convert.spec import (SIZES, VARIANTS, MixerConfig, config_for, intermediate_names, num_params, param_shapes,
                          parse_variant, variant_name)

__all__ = ["SIZES", "VARIANTS", "MixerConfig", "ParamMismatchError", "check_params", "check_variant", "config_for",
           "infer_config", "intermediate_names", "num_params", "param_shapes", "parse_variant", "random_params",
           "variant_name"]
