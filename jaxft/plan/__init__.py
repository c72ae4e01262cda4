"""Planning a run before it starts: the dry run (`dry_run`: memory and FLOPs of the compiled
step, from `config.json` alone), its FLOPs model (`flops`), the settings search (`suggest`)
and the compile-only targets it can compile for (`tpu`).

`from jaxft import plan; plan.print_plan(cfg)` is the dry run from Python.
"""

from jaxft.plan.dry_run import (
    Bytes,
    Plan,
    array_bytes,
    describe,
    human_bytes,
    make_plan,
    print_plan,
)

__all__ = ["Bytes", "Plan", "array_bytes", "describe", "human_bytes", "make_plan", "print_plan"]
