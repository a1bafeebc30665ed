"""The C++ build cache: one folder per build key, which changes with what the build reads and nothing else."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from batchkin.kernels import dispatch

CSRC = Path(dispatch.csrc_path("rng.h")).parent


@pytest.fixture
def sources(tmp_path, monkeypatch):
    """A copy of batchkin/csrc that dispatch reads instead of the installed one."""
    folder = tmp_path / "csrc"
    folder.mkdir()
    for f in CSRC.iterdir():
        if f.suffix in (".cpp", ".h"):
            shutil.copy2(f, folder / f.name)
    monkeypatch.setattr(dispatch, "csrc_path", lambda name: folder / name)
    return folder


def _op(name: str = "drloc_pairs") -> dispatch.OpInfo:
    return dispatch.OpInfo(name, cpp_library=name, cpp_sources=(f"{name}.cpp",))


def test_the_key_changes_with_a_source_or_a_header_it_includes_and_nothing_else(sources):
    op = _op()
    key = dispatch.build_key(op)
    assert len(key) == 16 and dispatch.build_key(_op()) == key
    os.utime(sources / "drloc_pairs.cpp", (1, 1))  # a new timestamp, the same bytes
    assert dispatch.build_key(op) == key
    (sources / "batch_mix.cpp").write_text("// another op's source\n")
    assert dispatch.build_key(op) == key
    original = (sources / "drloc_pairs.cpp").read_bytes()
    (sources / "drloc_pairs.cpp").write_bytes(original + b"\n// one more line\n")
    changed = dispatch.build_key(op)
    assert changed != key
    (sources / "drloc_pairs.cpp").write_bytes(original)
    assert dispatch.build_key(op) == key  # back to the same sources: the same build
    (sources / "rng.h").write_bytes((sources / "rng.h").read_bytes() + b"\n")
    assert dispatch.build_key(op) not in (key, changed)
    assert dispatch.build_inputs(op)["sources"].keys() == {"drloc_pairs.cpp", "large_blocks.h", "rng.h"}


@pytest.mark.parametrize("change", ["torch", "python", "compiler", "cflags", "ldflags", "torch_location"])
def test_the_key_changes_with_the_environment(sources, monkeypatch, change):
    op = _op()
    key = dispatch.build_key(op)
    if change == "torch":
        monkeypatch.setattr(dispatch.torch, "__version__", "9.9.9")
    elif change == "python":
        monkeypatch.setattr(dispatch.platform, "python_version", lambda: "3.99.0")
    elif change == "compiler":
        monkeypatch.setattr(dispatch, "compiler_identity", lambda cxx: "/usr/bin/clang++: clang version 99")
    elif change == "cflags":
        monkeypatch.setattr(dispatch, "CPP_CFLAGS", (*dispatch.CPP_CFLAGS, "-march=native"))
    elif change == "ldflags":
        monkeypatch.setattr(dispatch, "CPP_LDFLAGS", ())
    else:
        monkeypatch.setattr(dispatch.torch, "__file__", "/elsewhere/site-packages/torch/__init__.py")
    assert dispatch.build_key(op) != key


def test_the_compiler_identity_names_the_binary_and_its_version():
    ident = dispatch.compiler_identity("c++")
    path, _, version = ident.partition(": ")
    assert os.path.isabs(path) and version and version != "unknown version"
    assert dispatch.compiler_identity("no-such-compiler-xyz").endswith(": unknown version")


def test_a_build_says_so_once_in_its_own_folder(sources, tmp_path, monkeypatch, capsys):
    """The first build prints one line on stderr and compiles into <cache>/<op>-<key>; a process
    that finds the library built there loads it without a word."""
    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv(dispatch.ENV_CACHE, str(tmp_path / "cache"))
    calls = []

    def fake_load(name, sources, build_directory, **kwargs):
        calls.append((name, sources, build_directory, kwargs["extra_cflags"]))
        (Path(build_directory) / f"{name}.so").write_bytes(b"built")

    monkeypatch.setattr(cpp, "load", fake_load)
    op = _op()
    assert dispatch.load_cpp(op)
    expected = tmp_path / "cache" / f"drloc_pairs-{dispatch.build_key(op)}"
    assert calls == [("batchkin_drloc_pairs", [str(sources / "drloc_pairs.cpp")], str(expected),
                      list(dispatch.CPP_CFLAGS))]
    assert capsys.readouterr().err == "batchkin: building the C++ ops (first use, ~20 s): drloc_pairs\n"
    assert dispatch.load_cpp(_op())  # another process: already built
    assert capsys.readouterr().err == "" and len(calls) == 2
    (sources / "drloc_pairs.cpp").write_text("// changed\n")
    assert dispatch.load_cpp(_op())  # changed sources: a new folder, built again
    assert capsys.readouterr().err.startswith("batchkin: building the C++ ops")
    assert calls[-1][2] != str(expected) and Path(expected, "batchkin_drloc_pairs.so").is_file()
