"""benchmarks/results/results_*.json -> benchmarks/results/results_cpu.png (speed ratios and converter cost)."""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def main(speed=RESULTS_DIR / "results_speed_cpu.json", conv=RESULTS_DIR / "results_convert_h14_cpu.json",
         out=RESULTS_DIR / "results_cpu.png"):
    s, c = json.loads(Path(speed).read_text()), json.loads(Path(conv).read_text())
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    inf = s["inference"]
    labels = [f"{r['variant']} b{r['batch']}" for r in inf]
    xs = range(len(inf))
    ax[0].bar([x - 0.2 for x in xs], [r["flax_peak_frac"] * 100 for r in inf], 0.4, label="Flax (jit)")
    ax[0].bar([x + 0.2 for x in xs], [r["torch_peak_frac"] * 100 for r in inf], 0.4, label="our PyTorch")
    ax[0].axhline(60, color="k", ls="--", lw=0.8)
    ax[0].set_xticks(list(xs), labels)
    ax[0].set_ylabel("% of measured fp32 matmul peak")
    ax[0].set_title(f"inference ({s['peak']['peak_flops'] / 1e9:.0f} GFLOP/s peak, {s['info']['cpus']} CPUs)")
    ax[0].legend()
    rows = [(f"{t['variant']} b{r['batch']}", r["ratio"], r["ratio_same_function"])
            for t in s["timm"] if "rows" in t for r in t["rows"]]
    xs = range(len(rows))
    ax[1].bar([x - 0.2 for x in xs], [r[2] for r in rows], 0.4, label="vs timm with tanh GELU (same function)")
    ax[1].bar([x + 0.2 for x in xs], [r[1] for r in rows], 0.4, label="vs timm default (exact GELU)")
    ax[1].set_xticks(list(xs), [r[0] for r in rows])
    ax[1].set_ylim(0.8, 1.1)
    ax[1].axhline(1.0, color="k", ls="--", lw=0.8)
    ax[1].legend(fontsize=7, loc="lower right")
    ax[1].set_title("speed: our PyTorch / timm (same torch)")
    conv_rows = c["rows"]
    ax[2].bar([r["job"].replace(" -> ", "\n") for r in conv_rows], [r["peak_rss_vs_file"] for r in conv_rows],
              color="tab:purple")
    ax[2].axhline(2.0, color="r", ls="--", lw=0.8)
    ax[2].set_title(f"converter peak RSS / file size ({c['variant']}, {c['file_bytes'] / 2**30:.1f} GiB)")
    ax[2].tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
