r"""Convert a checkpoint jaxft can read (HF directory, hub id, `.gguf` file) to a HF directory.

  python -m jaxft.convert --model=path/to/model.gguf --out=/tmp/smollm2-hf

Loads the weights into jaxft (checking every tensor against the model), writes them back with
Hugging Face names as safetensors, and copies the tokenizer, so `transformers` can load the result.
"""

from __future__ import annotations

from absl import app, flags

from jaxft import cli, outdir
from jaxft.hf import weights

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "HF model directory, hub id or .gguf file.", required=True)
flags.DEFINE_string("out", None, "Output directory.", required=True)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Output dtype.")
flags.DEFINE_bool("overwrite", False, "Write into an existing non-empty directory.")


def main(argv: list[str]) -> None:
    cli.start(argv)
    with cli.user_errors():
        outdir.check_output(FLAGS.out, overwrite=FLAGS.overwrite)  # before loading, not after
        model = weights.load_hf_model(FLAGS.model)
        out = weights.save_pretrained(model, FLAGS.out, dtype=FLAGS.dtype,
                                      overwrite=FLAGS.overwrite)
        weights.copy_tokenizer(FLAGS.model, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
