"""The ``--device`` option: the device-generic tests run on ``cpu`` (default) or e.g. ``cuda``.

``make test-gpu`` runs ``pytest --device cuda``. Tests that take the ``device`` fixture build their
models and batches on the CPU from a seed and move them there, so a seed means the same numbers
on every device. A test marked ``cuda`` needs a CUDA device and is skipped, with that reason,
unless ``--device`` names one. The distributed tests take ``dist_device_type`` instead: NCCL on
two GPUs under ``--device cuda`` where there are two, else gloo on the CPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from ranks import rank_device_type


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        help="device for the device-generic tests: cpu (default), cuda, cuda:1, ...",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (pytest --device cuda)")
    name = config.getoption("--device", default="cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise pytest.UsageError(
            f"Expected --device to name a torch device, but got {name!r}"
        ) from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(
            f"Expected --device {name} to be available, but torch.cuda.is_available() is False "
            f"(torch {torch.__version__})"
        )
    if device.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"Expected --device to be cpu or cuda[:N], but got {name!r}")
    if device.type == "cuda":
        # The tests compare runs bit for bit: no autotuned or atomic-add kernels.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def pytest_collection_modifyitems(config, items):
    if torch.device(config.getoption("--device")).type == "cuda":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: run pytest --device cuda (make test-gpu)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    """The device of ``--device``: where device-generic tests put their models and data."""
    return torch.device(pytestconfig.getoption("--device"))


@pytest.fixture(scope="session")
def dist_device_type(device: torch.device) -> str:
    """Where the two ranks of the distributed tests (DDP, FSDP2) run, as ``tests/ranks.py``
    takes it: ``"cuda"`` with ``--device cuda`` and at least two GPUs, NCCL across ``cuda:0``
    and ``cuda:1``; ``"cpu"`` otherwise, gloo on the CPU (with one GPU too: NCCL needs one GPU
    per rank). Their single-process reference runs on ``cuda:0`` or the CPU to match.
    """
    return rank_device_type(device)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models, restored after.

    Faster on tiny tensors and immune to a busy machine (OpenMP threads waiting for a busy core
    make small ops many times slower), and bit-exact comparisons need the same thread count in
    both runs. Use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate's state is a process-wide singleton fixed by the first ``Accelerator``.

    Reset before and after, as accelerate's own test cases do: the Hugging Face Trainer creates
    one too, so a test that runs after a Trainer test must not inherit its mixed precision.
    """
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    def reset() -> None:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    reset()
    yield
    reset()


@pytest.fixture
def method_registry():
    """Snapshot sparseopt's method registry; restore it after the test, passed or failed.

    A test that registers, overwrites or unregisters methods leaves the registry as it found it,
    so a failing test cannot leak a method into the next. Yields a copy of the snapshot (name ->
    factory): what the test found. Only the public API: ``unregister_method`` hands each factory
    back, ``register_method`` puts it back.
    """
    from sparseopt.methods import available_methods, register_method, unregister_method

    def restore(saved):
        for name in available_methods():
            unregister_method(name)
        for name, factory in saved.items():
            register_method(name, factory)

    saved = {name: unregister_method(name) for name in available_methods()}
    restore(saved)
    yield dict(saved)
    restore(saved)
