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
    tools = {"pytest", "ruff", "nbclient", "nbformat", "ipykernel"}  # test runners, not APIs
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
