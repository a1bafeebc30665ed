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


# ------------------------------------------------------------------------------ the README and the pages it links

README_LIMIT = 12_000  # bytes: the README is an entry point; details live in docs/
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "bench" / "results" / "README.md"]


def test_the_readme_is_short_and_leads_with_what_a_newcomer_needs():
    assert len(README.encode()) < README_LIMIT, f"README.md is {len(README.encode())} bytes"
    headings = re.findall(r"^## (.+)$", README, re.M)
    assert headings[:5] == ["Set-up: two commands", "Layout", "Command line", "Writing a plugin", "Results"]
    for stale in ("in progress", "/tmp/", "performance:start"):
        assert stale not in README, stale


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    for link in links:
        if re.match(r"[a-z]+://", link) or link.startswith("mailto:"):
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.relative_to(ROOT)}: {link} does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", target.read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, f"{page.relative_to(ROOT)}: no heading for #{anchor}"


def test_the_layout_table_names_the_import_name_of_every_package_folder():
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {folder: name for name, folder in setup["package-dir"].items()}
    rows = dict(re.findall(r"^\| `([\w/]+)/` \| `?([\w.—]+)`? \|", README, re.M))
    for folder, name in folders.items():
        assert rows.get(folder) == name, f"README's layout table: {folder}/ should read {name}"
    for folder, name in rows.items():  # a sub-package row names the package its folder holds
        if name != "—":
            assert name in setup["packages"] and (ROOT / folder).is_dir(), folder
        else:
            assert (ROOT / folder).is_dir() and folder not in folders, folder


def _targets(text: str) -> tuple[str, list[tuple[str, str]]]:
    """The date and the (target, status) rows of a performance target table."""
    date = re.search(r"as of (\d{4}-\d{2}-\d{2})", text).group(1)
    table = text[text.index("| target |"):].split("\n\n", 1)[0].splitlines()
    cells = [[c.strip() for c in row.strip().strip("|").split(" | ")] for row in table[2:]]
    return date, [(c[0], c[-1]) for c in cells]


def test_the_readme_targets_are_those_of_the_performance_results():
    perf = (ROOT / "bench" / "results" / "README.md").read_text()
    ours, theirs = _targets(README.split("## Results", 1)[1]), _targets(perf.split("## Targets", 1)[1])
    assert ours == theirs
    assert len(ours[1]) >= 10 and {status for _, status in ours[1]} >= {"met", "not met"}


def test_the_readme_plugin_runs_as_written(tmp_path):
    """The README's plugin is complete: loaded as a file it trains, its loss term is the
    label-smoothed cross-entropy of the step's logits, and its option is checked."""
    import torch.nn.functional as F

    from batchkin.errors import ConfigError
    from batchkin.testing import run_plugin, tiny_config

    code = re.search(r"```python\n(.*?)\n```", README.split("## Writing a plugin", 1)[1], re.S).group(1)
    path = tmp_path / "smooth.py"
    path.write_text(code)
    state = run_plugin(["smooth"], plugin_files=[path], steps=2)
    want = F.cross_entropy(state.outputs["logits"].float(), state.targets(), label_smoothing=0.1)
    assert list(state.loss_terms) == ["smooth_ce"]
    assert float(state.loss_terms["smooth_ce"].detach()) == pytest.approx(float(want), rel=1e-5)
    bad = tiny_config(["smooth"], smooth={"eps": 1.5})
    with pytest.raises(ConfigError, match=r"smooth.eps"):
        run_plugin(["smooth"], plugin_files=[path], config=bad)
