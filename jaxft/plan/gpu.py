"""NVIDIA GPUs by name, as compile-only devices on any machine: what `--topology=h100` compiles for.

JAX's CUDA plugin carries XLA:GPU's compiler, and like XLA:TPU's it needs no device: given a
card's description (a `GpuTargetConfigProto`: SM count, compute capability, shared memory, L2,
memory size), `jax.experimental.topologies` hands out devices that `jit` can lower and compile
for, never run on. Compiling the real train step over a mesh of them gives XLA:GPU's own
`memory_analysis()` for that card, on a laptop with no GPU.

Unlike XLA:TPU, XLA:GPU never refuses a program that does not fit: it logs a warning and
compiles anyway. The verdict is therefore this module's: the step's peak against what JAX's
allocator hands a program on one GPU, `XLA_PYTHON_CLIENT_MEM_FRACTION` of its memory (0.75 by
default, whether or not it preallocates; the rest holds the CUDA context, cuDNN/cuBLAS
workspaces and NCCL's buffers).

Cards ship as data (`gpus/*.txtpb`): XLA's own descriptions where XLA has them, less the fields
the installed plugin's proto does not know yet, and descriptions written from the vendor's
figures for the rest, each with the source of every figure in its header. A user's own
description is a path to its `.txtpb`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from jaxft.errors import JaxftError

GIB = 1024**3
SPECS = Path(__file__).with_name("gpus")
DEVICES_PER_HOST = 8  # an HGX/DGX box; more GPUs than that come as hosts of eight
DEFAULT_MEMORY_FRACTION = 0.75  # JAX's BFC pool: this share of the card, preallocated or not


@dataclasses.dataclass(frozen=True)
class Card:
    """One card: its description file and its dense bf16 tensor-core peak (no sparsity, FP32
    accumulate), as NVIDIA publishes it (the source beside each entry of `CARDS`)."""

    spec: str  # gpus/<spec>.txtpb
    peak_tflops: float
    label: str


# Dense bf16 peaks: NVIDIA's datasheets (H100 SXM 989 / PCIe 756, H200 989, A100 312, B200
# 2250, L4 121, RTX A6000 154.8), the Ada whitepaper's "BF16 with FP32 accumulate" row for
# GeForce cards (RTX 4090 165.2; the 4060 and 4080 Laptop's 29.1 and 67.7 at their top boost
# clocks, 2.37 and 2.28 GHz), the
# GA106 figures for the RTX 3060 (25.5), and AWS's for the A10G (70).
CARDS: dict[str, Card] = {
    "h100": Card("h100_sxm", 989, "H100 SXM 80GB"),
    "h100-pcie": Card("h100_pcie", 756, "H100 PCIe 80GB"),
    "h200": Card("h200", 989, "H200 141GB"),
    "a100-80": Card("a100_sxm_80", 312, "A100 SXM 80GB"),
    "a100-40": Card("a100_sxm_40", 312, "A100 SXM 40GB"),
    "a100-pcie": Card("a100_pcie_80", 312, "A100 PCIe 80GB"),
    "b200": Card("b200", 2250, "B200 180GB"),
    "a6000": Card("a6000", 154.8, "RTX A6000 48GB"),
    "l4": Card("l4", 121, "L4 24GB"),
    "a10g": Card("a10g", 70, "A10G 24GB"),
    "rtx4090": Card("rtx4090", 165.2, "GeForce RTX 4090 24GB"),
    "rtx4060-laptop": Card("rtx4060-laptop", 29.1, "GeForce RTX 4060 Laptop 8GB"),
    "rtx4080-laptop": Card("rtx4080-laptop", 67.7, "GeForce RTX 4080 Laptop 12GB"),
    "rtx3060": Card("rtx3060", 25.5, "GeForce RTX 3060 12GB"),
}
# Without these the compiler crashes the process (a SIGFPE nothing can catch) or refuses every
# kernel, so a description lacking one is refused before it reaches XLA.
REQUIRED_FIELDS = ("threads_per_warp", "block_dim_limit_x", "shared_memory_per_block_optin",
                   "device_memory_size", "cuda_compute_capability")


@dataclasses.dataclass(frozen=True)
class GpuTopology:
    """Compile-only GPUs: the name asked for, the card (None: a user's description), the
    topology ("<partitions>x<hosts>x<GPUs per host>") and the devices."""

    name: str
    card: Card | None
    shape: str
    devices: tuple
    memory_bytes: int  # one GPU's memory, from its description
    compiler: str = "XLA:GPU"
    device_word: str = "GPU"
    memory_word: str = "memory"

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def peak_tflops(self) -> float | None:
        """Dense bf16 TFLOP/s of one GPU (None for a user's card: no time bound)."""
        return None if self.card is None else self.card.peak_tflops

    @property
    def peak_flops(self) -> float | None:
        """bf16 FLOP/s of all the GPUs."""
        return None if self.card is None else self.card.peak_tflops * 1e12 * self.num_devices

    def describe(self) -> str:
        kind = self.devices[0].device_kind or (self.card.label if self.card else "GPU")
        return (f"{self.name} ({self.num_devices} × {kind}, {self.memory_bytes / GIB:.1f} GiB "
                f"each)")

    def usable_bytes(self) -> int:
        """What JAX's allocator lets a program use on one GPU: `memory_fraction()` of it."""
        return int(memory_fraction() * self.memory_bytes)

    def capacity_note(self) -> str:
        return (f"{memory_fraction():.0%} of {self.memory_bytes / GIB:.1f} GiB, JAX's "
                f"allocator share (XLA_PYTHON_CLIENT_MEM_FRACTION)")

    @staticmethod
    def refusal(error: BaseException) -> str | None:
        """XLA:GPU compiles what does not fit (the verdict compares sizes instead)."""
        return None

    @staticmethod
    def compile(lowered) -> tuple[object, list[str]]:
        """(compiled, what XLA:GPU said about memory): `compile_quietly`."""
        return compile_quietly(lowered)


def memory_fraction() -> float:
    """The share of a GPU's memory JAX's allocator takes, as the process that trains will read
    it: XLA_CLIENT_MEM_FRACTION, or its older name XLA_PYTHON_CLIENT_MEM_FRACTION, else 0.75."""
    value = os.environ.get("XLA_CLIENT_MEM_FRACTION") or os.environ.get(
        "XLA_PYTHON_CLIENT_MEM_FRACTION")
    if not value:
        return DEFAULT_MEMORY_FRACTION
    try:
        fraction = float(value)
    except ValueError:
        fraction = -1.0
    if not 0 < fraction <= 1:
        raise JaxftError(f"XLA_PYTHON_CLIENT_MEM_FRACTION is {value!r}, expected a number in "
                         "(0, 1]")
    return fraction


def known_names() -> list[str]:
    return list(CARDS)


def looks_like_gpu(name: str) -> bool:
    """Whether a `--topology` names GPUs (a card, `<card>x<n>`, or a .txtpb path) rather than a
    TPU slice."""
    text = name.strip().lower()
    counted = re.fullmatch(r"(.+?)x\d+", text)  # `rtx4090` is a card, `rtx4090x2` two of them
    return (text in CARDS or (counted is not None and counted.group(1) in CARDS)
            or name.strip().endswith(".txtpb") or Path(name).expanduser().is_file())


def parse(name: str) -> tuple[Card | None, Path, str]:
    """(card, its description file, topology string) for `h100`, `h100x8`, `rtx4090x2` or a
    path to a `.txtpb` (also `<path>x8`)."""
    text = name.strip()
    counted = re.fullmatch(r"(.+?)x(\d+)", text)
    base, count = (counted.group(1), int(counted.group(2))) if counted and (
        counted.group(1).lower() in CARDS or counted.group(1).endswith(".txtpb")) else (text, 1)
    if count < 1:
        raise JaxftError(f"--topology {name}: the number of GPUs must be at least 1")
    if count <= DEVICES_PER_HOST:
        shape = f"1x1x{count}"
    elif count % DEVICES_PER_HOST == 0:
        shape = f"1x{count // DEVICES_PER_HOST}x{DEVICES_PER_HOST}"
    else:
        raise JaxftError(f"--topology {name}: more than {DEVICES_PER_HOST} GPUs come as hosts of "
                         f"{DEVICES_PER_HOST}; ask for a multiple of {DEVICES_PER_HOST}")
    card = CARDS.get(base.lower())
    if card is not None:
        return card, SPECS / f"{card.spec}.txtpb", shape
    path = Path(base).expanduser()
    if base.endswith(".txtpb") or path.is_file():
        if not path.is_file():
            raise JaxftError(f"--topology {name}: {path} does not exist (a GpuTargetConfigProto "
                             "in text form)")
        return None, path, shape
    raise JaxftError(f"--topology: {name!r} is not a GPU jaxft knows; known: "
                     f"{', '.join(known_names())} (each with x<n> for n of them, e.g. h100x8), "
                     "or the path of a card's .txtpb description")


def install_command() -> str:
    """The one command that brings XLA:GPU's compiler for the installed jax (no CUDA needed)."""
    return f'pip install "jaxft[gpu-plan]" "jax[cuda12-local]=={importlib.metadata.version("jax")}"'


def topology(name: str) -> GpuTopology:
    """The compile-only devices of `name` (see `parse`); no GPU needed, the CUDA plugin is."""
    card, path, shape = parse(name)
    text = path.read_text()
    missing = [f for f in REQUIRED_FIELDS if not re.search(rf"^\s*{f}\s*[:{{]", text, re.M)]
    if missing:
        raise JaxftError(f"{path}: field {missing[0]} is missing (a card description needs "
                         f"{', '.join(REQUIRED_FIELDS)})")
    memory = int(re.search(r"^\s*device_memory_size:\s*(\d+)", text, re.M).group(1))
    if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        raise JaxftError(f"--topology {name} compiles with XLA's GPU compiler, which comes with "
                         f"JAX's CUDA plugin; install it with: {install_command()}")
    _cpu_first()
    from jax.experimental import topologies

    dropped = []
    for _ in range(64):  # the parser names one unknown field at a time
        with _captured_stderr() as log:
            try:
                devices = topologies.get_topology_desc(platform="cuda", topology=shape,
                                                       target_config=text).devices
                break
            except NotImplementedError:
                raise JaxftError(f"--topology {name}: JAX's CUDA plugin did not register; run "
                                 "with JAX_PLATFORMS=cpu on a machine without a GPU") from None
            except Exception as e:  # noqa: BLE001  (the plugin reports refusals as errors)
                error = str(e).splitlines()[0]
        unknown = re.search(r'(\d+):\d+: Message type "[\w.]+" has no field named "(\w+)"',
                            log.text)
        if not unknown:
            found = re.search(r"(\d+):\d+: (.*)", log.text)
            where = error
            if found:
                line = text.split("\n")[int(found.group(1)) - 1].strip()
                field = re.split(r"[\s:{]", line, maxsplit=1)[0]
                where = f"line {found.group(1)}, field {field}: {found.group(2).strip()}"
            raise JaxftError(f"{path}: not a GpuTargetConfigProto XLA:GPU reads ({where})")
        dropped.append(unknown.group(2))
        text = _without_line(text, int(unknown.group(1)))
    else:
        raise JaxftError(f"{path}: too many fields the installed CUDA plugin does not know")
    return GpuTopology(name, card, shape, tuple(devices), memory)


def _without_line(text: str, lineno: int) -> str:
    """`text` without the field on line `lineno` (1-based): the line, or its whole {...}
    block. Newer XLA descriptions carry fields an older plugin's proto lacks."""
    lines = text.split("\n")
    start = end = lineno - 1
    if lines[start].rstrip().endswith("{"):
        depth = 0
        for end in range(start, len(lines)):
            depth += lines[end].count("{") - lines[end].count("}")
            if depth == 0:
                break
    del lines[start:end + 1]
    return "\n".join(lines)


def _cpu_first() -> None:
    """Without a GPU the CUDA plugin registers only when JAX runs on the CPU alone (otherwise
    its start-up check fails and JAX drops it): choose the CPU while no backend has started."""
    import jax

    if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
        return
    if not Path("/dev/nvidiactl").exists():
        jax.config.update("jax_platforms", "cpu")


# XLA:GPU never refuses a program bigger than the card; it logs one of these and compiles.
_MEMORY_WARNINGS = re.compile(
    r"(The byte size of input/output arguments \(\d+\) exceeds the base limit \(\d+\)"
    r"|Can't reduce memory use below [^;\n]+; only reduced to [^,\n]+)")


def compile_quietly(lowered) -> tuple[object, list[str]]:
    """(compiled, XLA:GPU's memory warnings): its stderr is held back, and what it says about
    memory is returned for the plan to show."""
    with _captured_stderr() as log:
        compiled = lowered.compile()
    return compiled, [m.group(0) for m in _MEMORY_WARNINGS.finditer(log.text)]


@dataclasses.dataclass
class _Captured:
    text: str = ""


@contextlib.contextmanager
def _captured_stderr() -> Iterator[_Captured]:
    """What native code writes to stderr meanwhile (XLA's parse errors and warnings)."""
    captured = _Captured()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.text = sink.read().decode(errors="replace")


def hosts(shape: str) -> int:
    """Hosts of a topology string ("1x2x8": 2)."""
    return math.prod(int(d) for d in shape.split("x")[:2])
