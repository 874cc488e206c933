"""Our PyTorch Mixer vs timm's, same weights, same torch, one process: speed and outputs.
Run by an interpreter that has timm (MIXER_TIMM_PYTHON); prints one JSON line.

    python benchmarks/torch_vs_timm.py VARIANT BATCH [BATCH ...]
"""
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _checkout  # noqa: E402,F401  (mixer_convert from this checkout; the timm interpreter lacks the toolkit)

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

from common import timeit  # noqa: E402
from mixer_convert import config_for, random_params  # noqa: E402
from mixer_convert.layouts import LAYOUTS  # noqa: E402
from mixer_convert.spec import TIMM_NAMES  # noqa: E402
from mixer_torch import MlpMixer, load_flat  # noqa: E402




def set_gelu(model, approximate):
    for m in model.modules():
        if isinstance(m, torch.nn.GELU):
            m.approximate = approximate


def main(variant, batches):
    cfg = config_for(variant)
    flat = random_params(cfg, 0)
    ours = load_flat(MlpMixer(cfg), flat).eval()
    theirs = timm.create_model(TIMM_NAMES[variant], pretrained=False).eval()
    lay = LAYOUTS["timm"]
    theirs.load_state_dict({lay.key_to(k): torch.from_numpy(np.array(lay.value_to(k, v), order="C"))
                            for k, v in flat.items()})
    out = {"variant": variant, "torch": torch.__version__, "timm": timm.__version__, "threads": torch.get_num_threads(),
           "rows": []}
    for b in batches:
        x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (b, 3, 224, 224)).astype(np.float32))
        times = {"ours": [], "timm_exact": [], "timm_tanh": []}
        with torch.inference_mode():
            for rep in range(3):  # interleaved, so drift in machine speed hits all three alike
                times["ours"].append(timeit(lambda: ours(x)))
                set_gelu(theirs, "none")
                times["timm_exact"].append(timeit(lambda: theirs(x)))
                set_gelu(theirs, "tanh")  # the official function, the same as ours
                times["timm_tanh"].append(timeit(lambda: theirs(x)))
            diff = float((ours(x) - theirs(x)).abs().max())
        t = {k: statistics.median(v) for k, v in times.items()}
        out["rows"].append({"batch": b, "ours_img_s": b / t["ours"], "timm_img_s": b / t["timm_exact"],
                            "timm_tanh_img_s": b / t["timm_tanh"], "ratio": t["timm_exact"] / t["ours"],
                            "ratio_same_function": t["timm_tanh"] / t["ours"], "max_abs_vs_timm_tanh": diff})
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], [int(b) for b in sys.argv[2:]])
