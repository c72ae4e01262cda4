"""Will it fit on a TPU? The README's table, from XLA:TPU's own compiles, on any machine.

    pip install -e ".[tpu]"
    JAX_PLATFORMS=cpu python tools/tpu_fit.py                      # the whole table (~1-2 h)
    JAX_PLATFORMS=cpu python tools/tpu_fit.py --rows llama8b-lora  # one model and mode
    python tools/tpu_fit.py --rows= --readme                        # README table from the JSON

For each model (Llama-3.2-1B, Llama-3.1-8B: their published config.json sizes, written here, so
no weight or hub access is needed), each mode (LoRA rank 16 on all seven projections with a
bfloat16 base; full fine-tuning in bfloat16 with float32 AdamW moments) and each slice (v5e-8,
v5p-8, v6e-8), it runs `--dry_run --suggest` (`jaxft.plan.suggest.search`) at 8 rows of 2048 tokens
per step (the batch of `configs/lora.py`'s 8B example), and keeps the suggested setting, its
per-chip HBM from XLA:TPU, and its upper bound on tokens/s at the chips' peak bf16 rate. Llama-
3.1-70B LoRA is tried on slices in order of total HBM until one fits. The rows go to
`benchmarks/tpu_fit.json` and print as the README's markdown table (`--readme` writes it there,
between the `README_BEGIN` and `README_END` markers).
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

from jaxft import config as config_lib  # noqa: E402
from jaxft.plan import suggest, tpu  # noqa: E402

# Published config.json sizes (meta-llama on the hub).
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
         "rope_theta": 500000.0, "max_position_embeddings": 131072, "vocab_size": 128256,
         "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
MODELS = {
    "llama1b": ("Llama-3.2-1B", {**LLAMA, "hidden_size": 2048, "intermediate_size": 8192,
                                 "num_hidden_layers": 16, "num_attention_heads": 32,
                                 "num_key_value_heads": 8, "head_dim": 64,
                                 "rope_scaling": {**LLAMA["rope_scaling"], "factor": 32.0},
                                 "tie_word_embeddings": True}),
    "llama8b": ("Llama-3.1-8B", {**LLAMA, "hidden_size": 4096, "intermediate_size": 14336,
                                 "num_hidden_layers": 32, "num_attention_heads": 32,
                                 "num_key_value_heads": 8, "tie_word_embeddings": False}),
    "llama70b": ("Llama-3.1-70B", {**LLAMA, "hidden_size": 8192, "intermediate_size": 28672,
                                   "num_hidden_layers": 80, "num_attention_heads": 64,
                                   "num_key_value_heads": 8, "tie_word_embeddings": False}),
}
SLICES = ("v5e-8", "v5p-8", "v6e-8")
SLICES_70B = ("v5e-8", "v6e-8", "v5e-16", "v5p-8")  # by total HBM: 126, 250, 252, 383 GiB
ROWS = [f"{m}-{mode}" for m in ("llama1b", "llama8b") for mode in ("lora", "full")] + \
    ["llama70b-lora"]
BATCH, SEQ = 8, 2048
README_BEGIN = "<!-- tpu_fit table: written by `python tools/tpu_fit.py --readme` -->"
README_END = "<!-- end of tpu_fit table -->"


def run_config(model_dir: Path, mode: str):
    cfg = config_lib.base_config()
    with cfg.unlocked():
        cfg.model.path = str(model_dir)
        cfg.data.train_path = "none.jsonl"  # a dry run reads no data
        cfg.train.batch_size, cfg.data.max_len = BATCH, SEQ
        cfg.train.param_dtype = "bfloat16"
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, -1, 1
        cfg.lora.enabled = mode == "lora"
        cfg.lora.rank, cfg.lora.alpha = 16, 32
    return cfg


def fit(model: str, mode: str, slice_name: str, workdir: Path, max_compiles: int) -> dict:
    name, hf_config = MODELS[model]
    model_dir = workdir / model
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(hf_config))
    topology = tpu.topology(slice_name)
    started = time.perf_counter()
    trials = suggest.search(run_config(model_dir, mode), topology, max_compiles=max_compiles,
                            progress=lambda line: print(line, flush=True))
    best = next((t for t in trials if t.fits), None)
    compiled = [t for t in trials if t.plan is not None]
    row = {"model": name, "mode": mode, "slice": slice_name, "batch": BATCH, "seq": SEQ,
           "compiles": len(compiled), "search_s": round(time.perf_counter() - started),
           "fits": best is not None,
           "tried": [{"layout": t.candidate.layout, "remat": t.candidate.remat,
                      "accum_steps": t.candidate.accum_steps, "fits": t.fits,
                      "hbm_gib": round(t.plan.peak_bytes / tpu.GIB, 2)} for t in compiled]}
    if best is not None:
        p = best.plan
        row.update(layout=best.candidate.layout, remat=best.candidate.remat,
                   accum_steps=best.candidate.accum_steps, mesh=p.mesh,
                   hbm_gib=round(p.peak_bytes / tpu.GIB, 2),
                   capacity_gib=round(p.capacity / tpu.GIB, 2),
                   tokens_per_s_bound=round(p.tokens_per_second),
                   step_s_bound=round(p.step_seconds, 4),
                   trainable_params=p.trainable_params)
    print(json.dumps({k: v for k, v in row.items() if k != "tried"}), flush=True)
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| model | mode | slice | suggested setting | HBM per chip | ≤ tokens/s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if not r["fits"]:
            tried = ", ".join(f"{t['layout']}/{t['remat']}: {t['hbm_gib']} GiB"
                              for t in r["tried"])
            lines.append(f"| {r['model']} | {r['mode']} | {r['slice']} | does not fit "
                         f"({tried}) | | |")
            continue
        setting = (f"mesh {r['layout']} ({'×'.join(str(v) for v in r['mesh'].values())}), "
                   f"remat {r['remat']}, {r['accum_steps']} micro-batch(es)")
        lines.append(f"| {r['model']} | {r['mode']} | {r['slice']} | {setting} | "
                     f"{r['hbm_gib']} of {r['capacity_gib']} GiB | "
                     f"{r['tokens_per_s_bound']:,} |")
    return "\n".join(lines)


def write_readme(rows: list[dict], readme: Path = ROOT / "README.md") -> None:
    """Replace the table between the README's markers with `markdown(rows)`."""
    text = readme.read_text()
    head, _, rest = text.partition(README_BEGIN + "\n")
    _, _, tail = rest.partition(README_END)
    if not rest or not tail:
        raise SystemExit(f"{readme}: the table markers are missing")
    readme.write_text(f"{head}{README_BEGIN}\n{markdown(rows)}\n{README_END}{tail}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"any of {', '.join(ROWS)}")
    p.add_argument("--slices", default=",".join(SLICES))
    p.add_argument("--max-compiles", type=int, default=4, help="per row (suggest's budget)")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "tpu_fit.json")
    p.add_argument("--readme", action="store_true", help="write the table into README.md")
    a = p.parse_args()
    existing = json.loads(a.json.read_text()) if a.json.exists() else []
    rows: list[dict] = []

    def save() -> list[dict]:
        """The JSON's rows with this run's in place of those it measured again, written out
        (after every model, so a long run that stops keeps what it measured)."""
        fresh = {(r["model"], r["mode"], r["slice"]) for r in rows}
        merged = [r for r in existing if (r["model"], r["mode"], r["slice"]) not in fresh] + rows
        a.json.parent.mkdir(exist_ok=True)
        a.json.write_text(json.dumps(merged, indent=1) + "\n")
        return merged

    with tempfile.TemporaryDirectory() as tmp:
        for row_name in filter(None, a.rows.split(",")):
            model, mode = row_name.split("-")
            slices = SLICES_70B if model == "llama70b" else a.slices.split(",")
            for slice_name in slices:
                rows.append(fit(model, mode, slice_name, Path(tmp), a.max_compiles))
                if model == "llama70b" and rows[-1]["fits"]:
                    break  # the smallest slice where it fits
            save()
    merged = save()
    print(markdown(merged))
    if a.readme:
        write_readme(merged)


if __name__ == "__main__":
    main()
