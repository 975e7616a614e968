"""constraints.txt: checked offline in the default suite, resolved live under ``-m network``.

Offline (always): every line parses as a requirement, no two pins of one package apply to the
same Python, every exact pin satisfies what pyproject.toml asks for, torch is pinned exactly.

Live (``pytest -m network``; ``make test-matrix`` runs it, the default suite deselects it): a pin
whose newest release dropped a Python we support (pymdown-extensions 13 needs 3.11.5; Debian 12's
python3 is 3.11.2) breaks ``make`` there. uv's resolver checks each declared Python at its oldest
patch release (the strictest ``python_full_version``) without an interpreter, for the Linux x86_64
wheels CI installs. It reads the registry with the system's TLS certificates (``UV_SYSTEM_CERTS``,
as pip uses them, so a proxy's certificate authority works), and the tests skip with uv's reason
when uv is not installed or the registry cannot be fetched: no connection, a certificate uv
cannot verify, a timeout. With uv's cache warm each resolve takes a few seconds.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
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
TORCH_FLOOR = next(
    str(s.version)
    for r in PYPROJECT["dependencies"]
    if Requirement(r).name == "torch"
    for s in Requirement(r).specifier
    if s.operator == ">="
)


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


def uv_environment(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` with uv reading the system's certificates, unless the caller chose already.

    ``UV_SYSTEM_CERTS`` is the name uv 0.13 reads, ``UV_NATIVE_TLS`` the older one (uv 0.13 warns
    about it only when it is set alone).
    """
    if "UV_SYSTEM_CERTS" in environ or "UV_NATIVE_TLS" in environ:
        return dict(environ)
    return dict(environ) | {"UV_SYSTEM_CERTS": "1", "UV_NATIVE_TLS": "1"}


_TIMEOUT = 300


def _run_all(jobs: dict, uv: str, offline: bool) -> dict[str, tuple[int, str, str]]:
    procs = {
        name: subprocess.Popen(
            _compile_command(uv, python, constraints) + (["--offline"] if offline else []),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=uv_environment(dict(os.environ)),
        )
        for name, (python, constraints) in jobs.items()
    }
    out = {}
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            stderr += f"\nerror: Failed to fetch: uv pip compile timed out after {_TIMEOUT} s"
        out[name] = (proc.returncode, stdout, stderr)
    return out


# What uv prints when it cannot read the registry, as opposed to a resolution that fails.
_FETCH_FAILED = re.compile(
    r"Failed to (fetch|download)|error sending request|Could not connect|dns error|"
    r"tcp connect|certificate|UnknownIssuer|timed out|Network connectivity is disabled|"
    r"Connection (refused|reset)|proxy",
    re.IGNORECASE,
)


def cannot_fetch(returncode: int, stderr: str) -> str | None:
    """Why uv could not read the registry (its error line and last cause), or ``None``.

    ``None`` for a success and for a resolution that failed ("No solution found"): the latter is
    what the tests exist to catch.
    """
    if returncode == 0 or "No solution found" in stderr or not _FETCH_FAILED.search(stderr):
        return None
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    error = next((line for line in lines if line.startswith("error:")), lines[0])
    causes = [line for line in lines if line.startswith("cause:")]
    return error + (f" ({causes[-1]})" if causes else "")


def _result(resolved: dict, name: str) -> tuple[int, str, str]:
    returncode, out, err = resolved[name]
    if (why := cannot_fetch(returncode, err)) is not None:
        pytest.skip(f"uv could not fetch from the package registry: {why}")
    return returncode, out, err


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
    returncode, out, err = _result(resolved, python)
    assert returncode == 0, err
    pins = dict(line.split("==", 1) for line in out.splitlines() if "==" in line)
    torch_pin = re.search(r"^torch==(\S+)", (ROOT / "constraints.txt").read_text(), re.M)
    # ``torch==2.13.0`` admits a local build such as 2.13.0+cpu (PEP 440), where an index has one
    assert Version(pins["torch"]).public == torch_pin.group(1)


@pytest.mark.network
def test_an_unresolvable_pin_is_caught(resolved):
    """Negative control: pymdown-extensions 13 without its marker fails on Python 3.11.2."""
    returncode, _, err = _result(resolved, "bad")
    assert returncode != 0
    assert "No solution found" in err
    assert "pymdown-extensions" in err


def test_the_default_suite_deselects_the_network_tests():
    """``make test`` and a plain ``pytest`` never reach the registry (issue 22, bug 4)."""
    pytest_ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]
    addopts = shlex.split(pytest_ini["ini_options"]["addopts"])
    assert addopts[addopts.index("-m") + 1] == "not network"
    network = [
        name
        for name, obj in globals().items()
        if name.startswith("test_")
        and any(m.name == "network" for m in getattr(obj, "pytestmark", []))
    ]
    assert sorted(network) == ["test_an_unresolvable_pin_is_caught", "test_constraints_resolve"]


# --- offline: the constraints file itself ----------------------------------------------------


def constraint_lines(text: str) -> list[Requirement]:
    """The requirements of a constraints file (comments and blank lines left out)."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [Requirement(line) for line in lines if line]


CONSTRAINTS = constraint_lines((ROOT / "constraints.txt").read_text())


def _environments() -> list[dict[str, str]]:
    """Marker environments for every declared Python, at patch releases 0 to 20."""
    return [
        {"python_version": p, "python_full_version": f"{p}.{patch}"}
        for p in declared_pythons()
        for patch in range(21)
    ]


def overlapping_pins(requirements: list[Requirement]) -> list[str]:
    """``"name on X.Y.Z"`` for every package with two constraints that apply to one Python."""
    out = []
    for env in _environments():
        seen: dict[str, int] = {}
        for req in requirements:
            if req.marker is None or req.marker.evaluate(env):
                name = canonicalize_name(req.name)
                seen[name] = seen.get(name, 0) + 1
        out += [f"{name} on {env['python_full_version']}" for name, n in seen.items() if n > 1]
    return out


def pins_outside_pyproject(requirements: list[Requirement]) -> list[str]:
    """Exact pins that pyproject.toml's requirement of the same package does not admit."""
    wanted = [Requirement(r) for r in PYPROJECT["dependencies"]]
    wanted += [
        Requirement(r) for extra in PYPROJECT["optional-dependencies"].values() for r in extra
    ]
    out = []
    for pin in requirements:
        exact = [s.version for s in pin.specifier if s.operator == "=="]
        out += [
            f"{pin} is outside {want}"
            for want in wanted
            if exact
            and canonicalize_name(want.name) == canonicalize_name(pin.name)
            and not want.specifier.contains(exact[0], prereleases=True)
        ]
    return out


def test_every_constraint_parses_and_torch_is_pinned_exactly():
    names = [canonicalize_name(req.name) for req in CONSTRAINTS]
    assert len(names) >= 10
    torch_pins = [req for req in CONSTRAINTS if canonicalize_name(req.name) == "torch"]
    assert len(torch_pins) == 1
    assert [s.operator for s in torch_pins[0].specifier] == ["=="]


def test_no_two_pins_apply_to_one_python():
    assert overlapping_pins(CONSTRAINTS) == []
    # Negative control: the pymdown-extensions pair without its split marker overlaps.
    bad = constraint_lines(
        "pymdown-extensions==13.1.2\npymdown-extensions==12.3; python_version < '3.12'"
    )
    assert "pymdown-extensions on 3.11.2" in overlapping_pins(bad)


def test_every_pin_satisfies_pyproject():
    assert pins_outside_pyproject(CONSTRAINTS) == []
    # Negative control: a torch below the floor.
    assert pins_outside_pyproject(constraint_lines("torch==2.5.1")) == [
        f"torch==2.5.1 is outside torch>={TORCH_FLOOR}"
    ]


def test_a_fetch_failure_is_told_apart_from_a_resolution_failure():
    """The stderr of uv 0.13 behind a proxy it cannot verify (issue 22), and of a real conflict."""
    tls = (
        "error: Failed to fetch: `https://pypi.org/simple/numpy/`\n"
        "  Caused by: error sending request for url (https://pypi.org/simple/numpy/)\n"
        "  cause: client error (Connect)\n"
        "  cause: invalid peer certificate: UnknownIssuer\n\n"
        "hint: Consider enabling use of system TLS certificates with the `--system-certs` flag\n"
    )
    why = cannot_fetch(2, tls)
    assert why is not None
    assert why.startswith("error: Failed to fetch")
    assert why.endswith("(cause: invalid peer certificate: UnknownIssuer)")
    conflict = (
        "  × No solution found when resolving dependencies for split (python_full_version == "
        "'3.11.2'):\n  ╰─▶ Because pymdown-extensions==13.1.2 depends on Python>=3.11.5 ...\n"
    )
    assert cannot_fetch(1, conflict) is None
    assert cannot_fetch(0, "") is None
    assert cannot_fetch(2, "error: Failed to parse `constraints.txt`") is None  # a real error


def test_uv_reads_the_system_certificates_unless_told_otherwise():
    assert uv_environment({"PATH": "/bin"}) == {
        "PATH": "/bin",
        "UV_SYSTEM_CERTS": "1",
        "UV_NATIVE_TLS": "1",
    }
    assert uv_environment({"UV_NATIVE_TLS": "0"}) == {"UV_NATIVE_TLS": "0"}


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
