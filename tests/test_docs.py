"""The documentation matches the code: hooks, config keys, set-up commands."""

import dataclasses
import inspect
import re
import typing
from pathlib import Path

import pytest

from batchkin import config as C
from batchkin import hookspecs

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PLUGIN_DOCS = (ROOT / "docs" / "plugins.md").read_text()
CONFIG_DOCS = (ROOT / "docs" / "config.md").read_text()

SPECS = {n: f for n, f in vars(hookspecs).items() if hasattr(f, "batchkin_spec")}


def test_every_hook_spec_is_documented_with_its_signature():
    assert len(SPECS) >= 15
    for name, func in SPECS.items():
        args = ", ".join(inspect.signature(func).parameters)
        assert re.search(
            rf"^### {name}\({re.escape(args)}\)", PLUGIN_DOCS, re.M), f"{name}({args}) missing from docs/plugins.md"
        firstresult = func.batchkin_spec.get("firstresult", False)
        heading = re.search(rf"^### {name}\(.*$", PLUGIN_DOCS, re.M).group(0)
        assert ("firstresult" in heading) == firstresult, f"{name}: firstresult marking differs from the spec"


def test_documented_hooks_all_exist():
    documented = re.findall(r"^### (\w+)\(", PLUGIN_DOCS, re.M)
    assert sorted(documented) == sorted(SPECS)


def test_hookspec_docstring_marks_every_hook_in_the_loop():
    doc = hookspecs.__doc__
    for name in SPECS:
        assert re.search(rf"\b{name}\(", doc), f"{name} is not marked in the loop of hookspecs' docstring"


@pytest.mark.parametrize("cls,prefix", [
    (C.Config, ""), (C.DataConfig, "data."), (C.OptimConfig, "optim."), (C.ScheduleConfig, "schedule."),
    (C.TrainConfig, "train."), (C.MetricsConfig, "metrics."), (C.LogConfig, "log."),
])
def test_every_config_key_is_in_the_config_reference(cls, prefix):
    assert "[docs/config.md](docs/config.md)" in README
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name in C.ENGINE_TABLES:
            continue
        if dataclasses.is_dataclass(hints[f.name]):  # a nested table: each of its keys is listed
            test_every_config_key_is_in_the_config_reference(hints[f.name], f"{prefix}{f.name}.")
            continue
        assert f"| `{prefix}{f.name}` |" in CONFIG_DOCS, f"{prefix}{f.name} is missing from docs/config.md"
        assert f.metadata.get("help"), f"{prefix}{f.name} has no help text"


def _readme_commands():
    return re.findall(r"```bash\n(.*?)\n```", README, re.S)


def test_ci_runs_exactly_the_readme_test_command():
    commands = _readme_commands()
    assert len(commands) >= 2
    install_and_run, install_and_test = commands[0], commands[1]
    assert "batchkin train configs/quickstart.toml" in install_and_run
    assert "pytest" in install_and_test
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install_and_test in ci, ".ci/run must run the README's test command verbatim"
    assert (ROOT / "configs" / "quickstart.toml").is_file()
