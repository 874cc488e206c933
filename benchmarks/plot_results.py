"""benchmarks/results/*.json -> plots of RESULTS.md's figures.

``python benchmarks/plot_results.py`` writes results/results_cpu.png (speed ratios and the H/14
converter's memory), as before; ``python benchmarks/plot_results.py --all DIR`` writes every figure
of :data:`FIGURES` into DIR (the documentation site draws them this way at build time)."""
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
    plt.close(fig)
    return Path(out)


def _bars(ax, labels, values, colour="tab:blue", fmt="{:.2f}"):
    ax.bar(range(len(values)), values, color=colour)
    ax.set_xticks(range(len(values)), labels, rotation=30, ha="right", fontsize=8)
    for x, v in enumerate(values):
        ax.text(x, v, fmt.format(v), ha="center", va="bottom", fontsize=7)


def input_pipeline(src=RESULTS_DIR / "results_input_cpu.json", out=RESULTS_DIR / "input_cpu.png"):
    """RESULTS.md "Input pipeline": img/s of each worker setup against the old loop; training on
    real JPEGs against synthetic batches."""
    d = json.loads(Path(src).read_text())
    runs = {"old loop": d["old_single_thread"], **{k.replace("x", " x", 1): v for k, v in d["input"].items()}}
    fig, ax = plt.subplots(1, 2, figsize=(13, 4))
    _bars(ax[0], list(runs), [r["img_s"] for r in runs.values()], fmt="{:.0f}")
    ax[0].set_ylabel("img/s (median of 5)")
    ax[0].set_title(f"input only, batch {d['batch']}, 224x224 ({d['machine']})")
    models = d["training"]
    kinds = (("synthetic", "synthetic batches"), ("real_new", "real JPEGs, new"), ("real_old", "real JPEGs, old loop"))
    for i, (key, label) in enumerate(kinds):
        ax[1].bar([j + (i - 1) * 0.27 for j in range(len(models))], [m[key] for m in models.values()], 0.27, label=label)
    ax[1].set_xticks(range(len(models)), list(models))
    ax[1].set_yscale("log")
    ax[1].set_ylabel("training img/s")
    ax[1].set_title("training step, batch 32 (data.workers=2)")
    ax[1].legend(fontsize=8)
    return _save(fig, out)


def eval_preprocess(src=RESULTS_DIR / "preprocess_cpu.json", out=RESULTS_DIR / "preprocess_cpu.png"):
    """RESULTS.md "Eval preprocessing": decode + preprocessing as a fraction of Pillow's decode speed."""
    d = json.loads(Path(src).read_text())
    methods = ("vit_jax", "vit_jax_numpy", "vit_jax_old", "big_vision", "big_vision_numpy", "big_vision_old")
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        label = m.replace("_numpy", " (numpy)").replace("_old", " (before)") + ("" if "_" in m[4:] else " (compiled)")
        ax.bar([j + (i - 2.5) * width for j in range(len(d["jpegs"]))],
               [j["methods"][m]["ratio_cpu"] for j in d["jpegs"].values()], width, label=label)
    ax.axhline(0.5, color="r", ls="--", lw=0.8, label="target 0.5")
    ax.set_xticks(range(len(d["jpegs"])), list(d["jpegs"]), fontsize=8)
    ax.set_ylabel("x Pillow's decode speed (1 thread)")
    ax.set_title(f"exact eval preprocessing, decode included ({d['machine']}, {d['kernels']})")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out)


def converter(src=RESULTS_DIR / "convert_l16_cpu.json", out=RESULTS_DIR / "convert_l16_cpu.png"):
    """RESULTS.md "Converter, L/16": time against copying the file, and peak memory against its size."""
    d = json.loads(Path(src).read_text())
    rows = d["rows"]
    fig, ax = plt.subplots(1, 2, figsize=(13, 4))
    _bars(ax[0], [r["job"] for r in rows], [r["vs_copy"] for r in rows], "tab:purple", "{:.1f}")
    ax[0].axhline(3.0, color="r", ls="--", lw=0.8)
    ax[0].set_ylabel("x the time of copying the file")
    ax[0].set_title(f"{d['variant']} ({d['file_bytes'] / 1e6:.0f} MB), median of {d['repeats']}; target 3x (npz/pt/safetensors)")
    _bars(ax[1], [r["job"] for r in rows], [r["peak_rss_vs_file"] for r in rows], "tab:gray")
    ax[1].set_ylabel("peak RSS / file size")
    ax[1].set_title("memory: streamed formats stay near 0.1x")
    return _save(fig, out)


def load_time(src=RESULTS_DIR / "results_load_cpu.json", out=RESULTS_DIR / "load_cpu.png"):
    """RESULTS.md "checkpoint -> ready model": seconds against timm's create_model + load."""
    d = json.loads(Path(src).read_text())
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [r["job"].replace("ours ", "").replace(": ", ":\n") for r in d["rows"]]
    _bars(ax, labels, [r["ratio_to_timm"] for r in d["rows"]], "tab:green")
    ax.axhline(1.0, color="k", ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("x timm's time (log)")
    ax.set_title(f"{d['variant']} checkpoint -> ready model; timm {d['timm']}: {d['timm_seconds']:.2f} s")
    return _save(fig, out)


def _save(fig, out) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return Path(out)


# name -> function(out=PATH) drawing one figure of RESULTS.md from the JSON in results/.
FIGURES = {"results_cpu.png": lambda out: main(out=out), "input_cpu.png": lambda out: input_pipeline(out=out),
           "preprocess_cpu.png": lambda out: eval_preprocess(out=out), "convert_l16_cpu.png": lambda out: converter(out=out),
           "load_cpu.png": lambda out: load_time(out=out)}


def draw_all(folder) -> list[Path]:
    """Every figure of :data:`FIGURES`, written into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, draw in FIGURES.items():
        draw(folder / name)
    return [folder / name for name in FIGURES]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--all"]:
        print("\n".join(f"wrote {p}" for p in draw_all(sys.argv[2] if len(sys.argv) > 2 else RESULTS_DIR)))
    else:
        print(f"wrote {main(*sys.argv[1:])}")
