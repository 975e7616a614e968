"""constraints.txt resolves on every Python that pyproject.toml declares (DESIGN.md §8).

A pin whose newest release dropped a Python we support (pymdown-extensions 13 needs 3.11.5;
Debian 12's python3 is 3.11.2) breaks ``make`` there. uv's resolver checks each declared Python
at its oldest patch release (the strictest ``python_full_version``) without an interpreter, for
the Linux x86_64 wheels CI installs; it reads the registry, so these tests skip with a reason when
uv is not installed or the registry cannot be reached. With uv's cache warm each resolve takes a
few seconds.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = ("test", "examples", "docs")
PLATFORM = "x86_64-manylinux_2_28"  # the torch 2.13 wheels' platform


def declared_pythons() -> list[str]:
    """The ``Programming Language :: Python :: 3.X`` classifiers of pyproject.toml."""
    pattern = re.compile(r"Programming Language :: Python :: (3\.\d+)$")
    return [m.group(1) for c in PYPROJECT["classifiers"] if (m := pattern.match(c))]


PYTHONS = [f"{p}.0" for p in declared_pythons()]  # the oldest patch release is the strictest


def _uv() -> str | None:
    try:
        import uv

        return uv.find_uv_bin()
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")


def _registry_unreachable() -> str | None:
    """Why the registry cannot be reached, or ``None`` if a TCP connection to it succeeds."""
    index = os.environ.get("UV_DEFAULT_INDEX") or os.environ.get("UV_INDEX_URL")
    host = urlparse(index).hostname if index else "pypi.org"
    if not host:
        return None  # a local index (file://): nothing to reach
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as e:
        return f"the package registry ({host}) cannot be reached: {e}"
    return None


def _compile_command(uv: str, python: str, constraints: Path) -> list[str]:
    cmd = [uv, "pip", "compile", "--quiet", "--no-header", "--python-version", python]
    cmd += ["--python-platform", PLATFORM, "pyproject.toml", "-c", str(constraints)]
    for extra in EXTRAS:
        cmd += ["--extra", extra]
    return cmd


def _run_all(jobs: dict, uv: str, offline: bool) -> dict[str, tuple[int, str, str]]:
    procs = {
        name: subprocess.Popen(
            _compile_command(uv, python, constraints) + (["--offline"] if offline else []),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (python, constraints) in jobs.items()
    }
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out[name] = (proc.returncode, stdout, stderr)
    return out


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> dict[str, tuple[int, str, str]]:
    """``{name: (returncode, stdout, stderr)}`` of every resolve, run at once, cache first."""
    uv = _uv()
    if uv is None:
        pytest.skip("uv is not installed (it comes with the test extra: pip install -e '.[test]')")
    if (why := _registry_unreachable()) is not None:
        pytest.skip(why)
    # Negative control: the pin that broke Debian's python (3.11.2), unconditional.
    text = re.sub(
        r"^pymdown-extensions==.*$", "", (ROOT / "constraints.txt").read_text(), flags=re.M
    )
    bad = tmp_path_factory.mktemp("constraints") / "constraints.txt"
    bad.write_text(text + "pymdown-extensions==13.1.2\n")
    jobs = {p: (p, ROOT / "constraints.txt") for p in PYTHONS} | {"bad": ("3.11.2", bad)}
    out = _run_all(jobs, uv, offline=True)  # from uv's cache: ~4 s
    retry = {name: jobs[name] for name, (returncode, _, _) in out.items() if returncode != 0}
    out |= _run_all(retry, uv, offline=False)  # a cold cache, or a real failure: ~15 s
    return out


def test_the_declared_pythons_span_requires_python():
    spec = SpecifierSet(PYPROJECT["requires-python"])
    pythons = declared_pythons()
    assert len(pythons) >= 2
    assert all(Version(f"{p}.0") in spec for p in pythons)
    oldest = Version(f"{pythons[0]}.0")
    below = Version(f"{oldest.major}.{oldest.minor - 1}.99")
    assert below not in spec, f"requires-python admits {below}, older than any declared Python"


@pytest.mark.network
@pytest.mark.parametrize("python", PYTHONS)
def test_constraints_resolve(python, resolved):
    returncode, out, err = resolved[python]
    assert returncode == 0, err
    pins = dict(line.split("==", 1) for line in out.splitlines() if "==" in line)
    torch_pin = re.search(r"^torch==(\S+)", (ROOT / "constraints.txt").read_text(), re.M)
    # ``torch==2.13.0`` admits a local build such as 2.13.0+cpu (PEP 440), where an index has one
    assert Version(pins["torch"]).public == torch_pin.group(1)


@pytest.mark.network
def test_an_unresolvable_pin_is_caught(resolved):
    """Negative control: pymdown-extensions 13 without its marker fails on Python 3.11.2."""
    returncode, _, err = resolved["bad"]
    assert returncode != 0
    assert "pymdown-extensions" in err


def test_the_torch_floor_is_declared_once():
    from sparseopt import _compat

    assert f"torch>={_compat.TORCH_FLOOR}" in PYPROJECT["dependencies"]


@pytest.mark.parametrize("version", ["2.4.1", "2.5.1+cpu", "2.5.0a0+git1234"])
def test_a_too_old_torch_fails_at_import_with_the_needed_version(version):
    from sparseopt import _compat

    with pytest.raises(
        ImportError, match=rf"Expected torch >= 2\.6, but got torch {re.escape(version)}"
    ):
        _compat.check_torch_version(version)


@pytest.mark.parametrize("version", ["2.6.0", "2.6.0+cpu", "2.6.0a0+git1234", "2.13.0", "3.0"])
def test_the_floor_and_newer_torch_pass(version):
    from sparseopt import _compat

    _compat.check_torch_version(version)
