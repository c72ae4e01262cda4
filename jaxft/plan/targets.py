"""What `--topology` names: a TPU slice (`jaxft.plan.tpu`) or NVIDIA GPUs (`jaxft.plan.gpu`), as
compile-only devices on this machine.

Both kinds answer the planner the same questions: their devices, their compiler's name, what one
device lets a program use (`usable_bytes`), the peak bf16 rate of one device, whether an error
from the compiler is an out-of-memory refusal (XLA:TPU refuses; XLA:GPU compiles and warns), and
how to compile so its warnings come back instead of reaching stderr.
"""

from __future__ import annotations

from typing import Protocol

from jaxft.errors import JaxftError
from jaxft.plan import gpu, tpu


class Target(Protocol):
    name: str
    devices: tuple
    compiler: str  # "XLA:TPU", "XLA:GPU"
    device_word: str  # "chip", "GPU"
    memory_word: str  # "HBM", "memory"

    @property
    def num_devices(self) -> int: ...

    @property
    def peak_tflops(self) -> float | None: ...

    @property
    def peak_flops(self) -> float | None: ...

    def describe(self) -> str: ...

    def usable_bytes(self) -> int: ...

    def capacity_note(self) -> str: ...

    def refusal(self, error: BaseException) -> str | None: ...

    def compile(self, lowered) -> tuple[object, list[str]]: ...


def target(name: str) -> Target:
    """The compile-only devices `--topology` names: `v5e-8`, `v4:2x2x2`, `h100`, `h100x8`,
    `rtx4060-laptop`, or the path of a GPU's `.txtpb` description."""
    if tpu.looks_like_tpu(name):
        return tpu.topology(name)
    if gpu.looks_like_gpu(name):
        return gpu.topology(name)
    raise JaxftError(f"--topology: {name!r} is neither a TPU slice jaxft knows (v5e-8, v4-8, "
                     f"v5p-8, v6e-8, other sizes, or '<chip>:<topology>') nor a GPU (known: "
                     f"{', '.join(gpu.known_names())}, each with x<n> for n of them, or the "
                     "path of a .txtpb description)")
