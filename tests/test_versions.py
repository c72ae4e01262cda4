"""The versions pyproject.toml declares are the versions these tests ran with."""

import importlib.metadata
import tomllib

from packaging.requirements import Requirement

from tests.tiny_run import REPO


def declared() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in (*project["dependencies"],
                                     *project["optional-dependencies"]["test"])]


def test_every_dependency_is_bounded_on_both_sides():
    """An open range admits releases nobody ran (a jax release has broken flax before)."""
    # test runners, not APIs
    tools = {"pytest", "pytest-xdist", "ruff", "nbclient", "nbformat", "ipykernel"}
    for requirement in declared():
        if requirement.name in tools:
            continue
        operators = {spec.operator for spec in requirement.specifier}
        assert {">=", "<"} <= operators, f"{requirement} needs a tested lower and an upper bound"


def test_installed_versions_are_within_the_declared_ranges():
    for requirement in declared():
        installed = importlib.metadata.version(requirement.name)
        assert requirement.specifier.contains(installed, prereleases=True), \
            f"{requirement.name} {installed} is outside the declared {requirement}"


def test_libtpu_is_the_one_the_installed_jax_pins():
    """The `tpu` extra asks for `jax[tpu]`, whose own extra pins the libtpu built for that jax
    release; a libtpu from another release can fail to load or compile differently."""
    import pytest

    try:
        installed = importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("libtpu is not installed (the `tpu` extra)")
    pins = [Requirement(r) for r in importlib.metadata.requires("jax") or []]
    pins = [r for r in pins if r.name == "libtpu" and r.marker
            and r.marker.evaluate({"extra": "tpu"})]
    assert pins, "the installed jax names no libtpu for its tpu extra"
    for pin in pins:
        assert pin.specifier.contains(installed, prereleases=True), \
            f"libtpu {installed} is not what jax {importlib.metadata.version('jax')} pins ({pin})"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (tpu,) = [Requirement(r) for r in project["optional-dependencies"]["tpu"]]
    assert tpu.name == "jax" and "tpu" in tpu.extras
    assert tpu.specifier == next(Requirement(r) for r in project["dependencies"]
                                 if r.startswith("jax>")).specifier
