"""Run as a script by a Python that has timm (see README: timm needs torchvision, which needs
its own torch build). Loads or exports timm Mixers and writes logits to an .npz, for the test
suite and mixer-parity. Never imported by the package itself.

  load   MODEL FILE PROBE.npy OUT.npz [NUM_CLASSES]  -- the user's command: create_model(pretrained=True, file=...)
  export MODEL OUT.pth PROBE.npy OUT.npz             -- timm's own init, its state dict and logits
  hub    DIR PROBE.npy OUT.npz                       -- a model folder: create_model("local-dir:DIR", pretrained=True)
Logits are written twice: with timm's exact GELU and with GELU switched to tanh.
"""
import json
import sys

import numpy as np
import timm
import torch
from torch import nn


def logits(model, probe):
    x = torch.from_numpy(np.load(probe))
    with torch.no_grad():
        exact = model(x).numpy()
        for m in model.modules():
            if isinstance(m, nn.GELU):
                m.approximate = "tanh"
        tanh = model(x).numpy()
    return {"exact": exact, "tanh": tanh}


def main(argv):
    mode, name = argv[0], argv[1]
    if mode == "hub":
        probe, out = argv[2:4]
        model = timm.create_model(f"local-dir:{name}", pretrained=True).eval()
        cfg = timm.data.resolve_data_config({}, model=model)
        np.savez(out, **logits(model, probe), version=np.array(timm.__version__), architecture=np.array(
            model.default_cfg["architecture"]), num_classes=np.array(model.num_classes),
            data_config=np.array(json.dumps(cfg)))
        return
    if mode == "load":
        path, probe, out = argv[2:5]
        overlay = dict(file=path)
        if len(argv) > 5:
            overlay["num_classes"] = int(argv[5])
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay,
                                  **({"num_classes": int(argv[5])} if len(argv) > 5 else {})).eval()
    else:
        pth, probe, out = argv[2:5]
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        with torch.no_grad():  # timm zero-inits the head; give it weights so logits mean something
            nn.init.normal_(model.head.weight, std=0.02)
            nn.init.normal_(model.head.bias, std=0.02)
        torch.save(model.state_dict(), pth)
    np.savez(out, **logits(model, probe), version=np.array(timm.__version__))


if __name__ == "__main__":
    main(sys.argv[1:])
