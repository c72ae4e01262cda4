"""Will it fit on a GPU? The README's two GPU tables, from XLA:GPU's own compiles, on any machine.

    pip install -e ".[gpu-plan]"
    JAX_PLATFORMS=cpu python tools/gpu_fit.py                    # both tables (~15 min on 2 CPUs)
    JAX_PLATFORMS=cpu python tools/gpu_fit.py --rows llama8b-lora --laptop=False
    python tools/gpu_fit.py --rows= --laptop=False --readme      # README tables from the JSON

The fit table: for Llama-3.2-1B and Llama-3.1-8B (their published config.json sizes, from
`tools/tpu_fit.py`), each mode (LoRA rank 16 on all seven projections over a bfloat16 base;
QLoRA, the same on an NF4 base with double quantization; full fine-tuning in bfloat16 with
float32 AdamW moments) and each GPU (one H100, eight H100s, an L4, an RTX 4090, an 8 GB RTX 4060
Laptop), it runs `--dry_run --suggest` (`jaxft.plan.suggest.search`) at 8 rows of 2048 tokens per
step and keeps the suggested setting, its per-GPU peak from XLA:GPU against what JAX lets a
program use of the card (`jaxft.plan.gpu`), and its bound on tokens/s at the card's peak bf16.

The laptop table: Llama-2-7B, LoRA rank 16, 1 × 2048 tokens, remat full, bf16 (`configs/qlora.py`
and `configs/lora.py`), on an NF4 base with double quantization and on a bfloat16 one, on an
8 GB and a 12 GB laptop GPU and a 24 GB desktop card.

Rows go to `benchmarks/gpu_fit.json`; `--readme` writes both tables into the README between
their markers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from tpu_fit import MODELS  # noqa: E402

from jaxft import config as config_lib  # noqa: E402
from jaxft.plan import dry_run, gpu, suggest  # noqa: E402

GPUS = ("h100", "h100x8", "l4", "rtx4090", "rtx4060-laptop")
MODES = ("lora", "qlora", "full")
ROWS = [f"{m}-{mode}" for m in ("llama1b", "llama8b") for mode in MODES]
BATCH, SEQ = 8, 2048
MAX_COMPILES = 8
# Llama-2-7B's published config.json (meta-llama on the hub).
LLAMA_2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
              "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False}
LAPTOP_GPUS = ("rtx4060-laptop", "rtx4080-laptop", "rtx4090")
FIT_BEGIN = "<!-- gpu_fit table: written by `python tools/gpu_fit.py --readme` -->"
FIT_END = "<!-- end of gpu_fit table -->"
LAPTOP_BEGIN = "<!-- gpu_fit laptop table: written by `python tools/gpu_fit.py --readme` -->"
LAPTOP_END = "<!-- end of gpu_fit laptop table -->"
GIB = 1024**3


def run_config(model_dir: Path, mode: str, *, batch: int = BATCH, seq: int = SEQ, **train):
    cfg = config_lib.base_config()
    with cfg.unlocked():
        cfg.model.path = str(model_dir)
        cfg.data.train_path = "none.jsonl"  # a dry run reads no data
        cfg.train.batch_size, cfg.data.max_len = batch, seq
        cfg.train.param_dtype = "bfloat16"
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, -1, 1
        cfg.lora.enabled = mode in ("lora", "qlora")
        cfg.lora.rank, cfg.lora.alpha = 16, 32
        if mode == "qlora":
            cfg.lora.base_quant, cfg.lora.double_quant = "nf4", True
        for field, value in train.items():
            cfg.train[field] = value
    return cfg


def write_model(workdir: Path, name: str, hf_config: dict) -> Path:
    model_dir = workdir / name
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(hf_config))
    return model_dir


def fit(model: str, mode: str, name: str, workdir: Path) -> dict:
    label, hf_config = MODELS[model]
    topology = gpu.topology(name)
    started = time.perf_counter()
    trials = suggest.search(run_config(write_model(workdir, model, hf_config), mode), topology,
                            max_compiles=MAX_COMPILES,
                            progress=lambda line: print(line, flush=True))
    best = next((t for t in trials if t.fits), None)
    compiled = [t for t in trials if t.plan is not None]
    row = {"model": label, "mode": mode, "gpu": name, "card": topology.card.label,
           "batch": BATCH, "seq": SEQ, "compiles": len(compiled),
           "search_s": round(time.perf_counter() - started), "fits": best is not None,
           "usable_gib": round(topology.usable_bytes() / GIB, 2),
           "tried": [{"layout": t.candidate.layout, "remat": t.candidate.remat,
                      "accum_steps": t.candidate.accum_steps, "fits": t.fits,
                      "peak_gib": round(t.plan.peak_bytes / GIB, 2)} for t in compiled]}
    if best is not None:
        p = best.plan
        row.update(layout=best.candidate.layout, remat=best.candidate.remat,
                   accum_steps=best.candidate.accum_steps, mesh=p.mesh,
                   peak_gib=round(p.peak_bytes / GIB, 2),
                   tokens_per_s_bound=round(p.tokens_per_second),
                   trainable_params=p.trainable_params)
    print(json.dumps({k: v for k, v in row.items() if k != "tried"}), flush=True)
    return row


def laptop(base: str, name: str, workdir: Path) -> dict:
    """Llama-2-7B QLoRA (`base` nf4) or LoRA on a bfloat16 base, 1 × 2048, remat full."""
    model_dir = write_model(workdir, "llama-2-7b", LLAMA_2_7B)
    topology = gpu.topology(name)
    plan = dry_run.make_plan(run_config(model_dir, "qlora" if base == "nf4" else "lora",
                                        batch=1, remat="full"), topology)
    row = {"model": "Llama-2-7B", "base": base, "gpu": name, "card": topology.card.label,
           "memory_gib": round(topology.memory_bytes / GIB, 2),
           "usable_gib": round(topology.usable_bytes() / GIB, 2),
           "peak_gib": round(plan.peak_bytes / GIB, 2), "fits": bool(plan.fits)}
    print(json.dumps(row), flush=True)
    return row


def fit_markdown(rows: list[dict]) -> str:
    lines = ["| model | mode | GPU | suggested setting | peak per GPU (usable) | ≤ tokens/s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if not r["fits"]:
            tried = ", ".join(f"{t['remat']}×{t['accum_steps']}: {t['peak_gib']} GiB"
                              for t in r["tried"])
            lines.append(f"| {r['model']} | {r['mode']} | {r['gpu']} | does not fit "
                         f"(remat×micro-batches tried: {tried}) | of {r['usable_gib']} GiB | |")
            continue
        mesh = "" if r["layout"] == "one device" else \
            f"mesh {r['layout']} ({'×'.join(str(v) for v in r['mesh'].values())}), "
        setting = f"{mesh}remat {r['remat']}, {r['accum_steps']} micro-batch(es)"
        lines.append(f"| {r['model']} | {r['mode']} | {r['gpu']} | {setting} | "
                     f"{r['peak_gib']} of {r['usable_gib']} GiB | "
                     f"{r['tokens_per_s_bound']:,} |")
    return "\n".join(lines)


def laptop_markdown(rows: list[dict]) -> str:
    cards = list(dict.fromkeys(r["gpu"] for r in rows))
    label = {r["gpu"]: f"{r['card']} ({r['usable_gib']} of {r['memory_gib']:g} GiB usable)"
             for r in rows}
    lines = ["| Llama-2-7B, LoRA r16, 1 × 2048, remat full | "
             + " | ".join(label[c] for c in cards) + " |",
             "|---|" + "---|" * len(cards)]
    for base, title in (("nf4", "NF4 + double quantization (`configs/qlora.py`)"),
                        ("bfloat16", "bfloat16 base (`configs/lora.py`)")):
        cells = []
        for c in cards:
            r = next(r for r in rows if r["gpu"] == c and r["base"] == base)
            cells.append(f"{'fits' if r['fits'] else 'does not fit'}: {r['peak_gib']} GiB")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_readme(rows: dict) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for begin, end, table in ((FIT_BEGIN, FIT_END, fit_markdown(rows["fit"])),
                              (LAPTOP_BEGIN, LAPTOP_END, laptop_markdown(rows["laptop"]))):
        head, rest = text.split(begin)
        _, tail = rest.split(end)
        text = f"{head}{begin}\n{table}\n{end}{tail}"
    readme.write_text(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ROWS), help="model-mode pairs (empty: none)")
    p.add_argument("--gpus", default=",".join(GPUS))
    p.add_argument("--laptop", default="True", help="also the laptop table (True/False)")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "gpu_fit.json")
    p.add_argument("--readme", action="store_true", help="write the tables into the README")
    a = p.parse_args(argv)
    saved = json.loads(a.json.read_text()) if a.json.exists() else {"fit": [], "laptop": []}
    wanted = [r for r in a.rows.split(",") if r]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for row in wanted:
            model, mode = row.split("-")
            for name in a.gpus.split(","):
                new = fit(model, mode, name, workdir)
                saved["fit"] = [r for r in saved["fit"] if (r["model"], r["mode"], r["gpu"])
                                != (new["model"], new["mode"], new["gpu"])] + [new]
        if a.laptop == "True":
            saved["laptop"] = [laptop(base, name, workdir) for base in ("nf4", "bfloat16")
                               for name in LAPTOP_GPUS]
    order = {(MODELS[m][0], mode): i for i, (m, mode) in
             enumerate((m, mode) for m in ("llama1b", "llama8b") for mode in MODES)}
    saved["fit"].sort(key=lambda r: (order[r["model"], r["mode"]], GPUS.index(r["gpu"])))
    if wanted or a.laptop == "True":
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(saved, indent=1) + "\n")
    print(fit_markdown(saved["fit"]))
    print(laptop_markdown(saved["laptop"]) if saved["laptop"] else "")
    if a.readme:
        write_readme(saved)


if __name__ == "__main__":
    main()
