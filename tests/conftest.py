"""Test-wide setup: 8 host CPU devices (sharding tests) before jax is first imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _compilers_without_an_accelerator() -> bool:
    """libtpu or JAX's CUDA plugin is installed (for the compile-only TPU and GPU tests) on a
    machine with no TPU or GPU. Then a jax process that is not told `JAX_PLATFORMS=cpu` tries
    to start a TPU first, and holds libtpu's lock file while it runs, which makes a TPU compile
    in another process fail; the CUDA plugin fails its start-up check and JAX drops it, so no
    compile-only GPU can be made."""
    import glob
    import importlib.util

    return ((importlib.util.find_spec("libtpu") is not None
             or importlib.util.find_spec("jax_plugins.xla_cuda12") is not None)
            and not glob.glob("/dev/accel*") and not glob.glob("/dev/vfio/[0-9]*")
            and not glob.glob("/dev/nvidia[0-9]*"))


if _compilers_without_an_accelerator():
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # children (subprocess_env) inherit it


import pytest  # noqa: E402  (after the environment above, as jax reads it on import)

# What the versions line of the report names: the stack jaxft's numerics depend on.
REPORTED = ("jax", "jaxlib", "libtpu", "flax", "optax", "orbax-checkpoint", "transformers",
            "tokenizers", "datasets", "safetensors", "huggingface_hub", "numpy", "torch", "peft",
            "bitsandbytes", "trl")


def pytest_terminal_summary(terminalreporter):
    """Said at the end of every run, `-q` included, so a log shows what it tested."""
    import importlib.metadata
    import sys

    found = []
    for name in REPORTED:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    terminalreporter.write_line(f"jaxft tested with: python {sys.version.split()[0]}, "
                                + ", ".join(found))


# The files that take longest start first: pytest-xdist's `--dist loadfile` hands out whole
# files in collection order (pyproject.toml turns off its reordering by test count), and a long
# file handed out last runs alone while the other worker idles.
LONGEST_FIRST = ("test_checkpoint.py", "test_readme_commands.py", "test_dpo_train.py",
                 "test_tpu_compile.py", "test_gpu_compile.py", "test_sharding.py",
                 "test_multihost.py", "test_benchmark.py", "test_data_streaming.py",
                 "test_model_configs.py",
                 "test_grpo_train.py", "test_families.py", "test_generate.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep


def pytest_configure(config):
    import jax

    if jax.default_backend() == "gpu":
        # Float32 parity needs float32 matmuls; a GPU would otherwise round inputs to TF32.
        jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A tiny byte-level BPE tokenizer with a ChatML template, trained on tests/data."""
    from tests.test_data_helpers import tiny_bpe

    return tiny_bpe(str(tmp_path_factory.mktemp("tiny_bpe")))


@pytest.fixture(scope="module")
def bert():
    """The real all-MiniLM-L6-v2 WordPiece tokenizer (skips if its package is missing)."""
    from jaxft import data
    from tests.real_weights import minilm_dir

    return data.load_tokenizer(minilm_dir())
