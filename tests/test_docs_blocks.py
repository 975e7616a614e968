"""Every Python code block of README.md and docs/**/*.md runs, unless it is marked a fragment.

How a page marks a block that cannot run here: an HTML comment on the line right before the
fence, ``<!-- fragment: why -->`` (GitHub and mkdocs render it as nothing). The reason is
required: "needs torchrun", "needs a CUDA device", "needs timm, not installable next to the
pinned torch". Use it only for code that cannot run on a CPU in a second or needs what the test
extra does not install; a block that merely continues another one runs on the stand-ins below.

How a block runs:

- **Alone.** Each block runs in a fresh namespace, in a temporary working directory, with
  ``torch.manual_seed(0)``; blocks never see each other's names, so they can be read (and fail)
  one at a time. Each is a test of its own, named ``file:line`` of its opening fence.
- **Stand-ins.** A block may use, without defining them, the names a reader's script already
  has. The test gives it exactly those it uses and does not bind itself (``STAND_INS``): the
  modules ``torch``, ``nn``, ``F``, ``sparseopt`` and its two main classes; ``T = 40`` optimizer
  steps and ``C = 2`` steps per cycle (two Sup-tickets cycles at the default 10%); ``model``, an
  MLP with BatchNorm on 20 features and 10 classes; ``loader`` / ``train_loader``, ``T`` batches
  of 16 for it, and ``x, y``, the first one; ``loss_fn``; ``evaluate(model)``, its accuracy on
  one batch; ``inner``, SGD over ``model`` (lr 0.1, momentum 0.9); ``opt``, RigL at 90% over
  ``inner`` (``seed=0``, ``model=model``), its masks applied; ``sched``,
  ``SupTicketsScheduler(opt, total_steps=T, cycle_steps=C)``; ``scaler``, a CPU ``GradScaler``;
  ``device``, the CPU; ``A = 2`` micro-batches; ``path``, ``checkpoint.pt``, which holds the
  ``"model"``, ``"opt"``, ``"sched"`` and ``"scaler"`` state of that same setup after 5 steps;
  ``ds``, a small token dataset for the Hugging Face ``Trainer``. Any other undefined name fails
  the block with a message that says so.
- **Includes.** A block of ``--8<--`` include lines (pymdownx.snippets, as mkdocs renders it)
  runs the text it includes.
- **Side effects** stay in the test: methods a block registers are unregistered afterwards, and
  Accelerate's process-wide state is reset around a block that uses it.
- **Pending.** Blocks on pages another change is still fixing are listed in ``PENDING`` with the
  reason: they run as expected failures until then.
- CPU only, no network: the whole module takes about 20 s on 2 cores (the ``Trainer`` block 8 s).
"""

from __future__ import annotations

import ast
import builtins
import re
import sys
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)[ \t]*(?P<lang>[\w+-]*)")
_MARKER = re.compile(r"^[ \t]*<!--\s*fragment\b:?(?P<reason>.*?)-->\s*$")
_LANGS = {"python", "py"}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    code: str  # dedented to the fence's indentation
    fragment: str | None  # the reason, or None when the block runs

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT).as_posix()}:{self.line}"


def parse_blocks(path: Path) -> list[Block]:
    """The Python blocks of a Markdown page, with their fragment markers."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opened = _FENCE.match(lines[i])
        if not opened:
            i += 1
            continue
        fence, indent = opened.group("fence"), len(opened.group("indent"))
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence[0] * len(fence)):
            end += 1
        if opened.group("lang") in _LANGS:
            body = "\n".join(line[indent:] for line in lines[i + 1 : end])
            marker = _MARKER.match(lines[i - 1]) if i > 0 else None
            reason = marker.group("reason").strip() if marker else None
            blocks.append(Block(path, i + 1, textwrap.dedent(body), reason))
        i = end + 1
    return blocks


def stray_markers(path: Path) -> list[int]:
    """Lines of fragment markers that are not right before a Python fence."""
    lines = path.read_text().splitlines()
    out = []
    for n, line in enumerate(lines):
        if _MARKER.match(line):
            nxt = _FENCE.match(lines[n + 1]) if n + 1 < len(lines) else None
            if not nxt or nxt.group("lang") not in _LANGS:
                out.append(n + 1)
    return out


BLOCKS = [block for page in PAGES for block in parse_blocks(page)]

# --- includes (pymdownx.snippets, base_path "."): "--8<--" lines around "path" or "path:section"


def resolve_includes(code: str, root: Path = ROOT) -> str:
    lines = [line.strip() for line in code.strip().splitlines()]
    if not lines or lines[0] != "--8<--":
        return code
    parts = []
    for spec in (line for line in lines if line and line != "--8<--"):
        file, _, section = spec.partition(":")
        text = (root / file).read_text()
        if section:
            start = re.search(rf"--8<-- \[start:{re.escape(section)}\][^\n]*\n", text)
            stop = re.search(rf"[^\n]*--8<-- \[end:{re.escape(section)}\]", text)
            if not (start and stop):
                raise ValueError(f"{file} has no section {section!r}")
            text = text[start.end() : stop.start()]
        parts.append(text)
    return "\n".join(parts)


# --- the names a block uses without defining them


def _names(tree: ast.AST) -> tuple[set[str], set[str]]:
    """(loaded, bound) names anywhere in ``tree``, over-approximating what it binds."""
    loaded, bound = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return loaded, bound


def free_names(tree: ast.Module) -> set[str]:
    """The names a block reads that it has not bound before: those the stand-ins may provide.

    A name read anywhere and bound nowhere is free; so is a name on the right of a top-level
    assignment before any earlier statement binds it (``model = prepare(model)``).
    """
    loaded, bound = _names(tree)
    free = loaded - bound
    bound_before: set[str] = set()
    for statement in tree.body:
        if isinstance(statement, ast.Assign | ast.AnnAssign | ast.AugAssign) and statement.value:
            read, bound_inside = _names(statement.value)  # lambda arguments, comprehensions
            free |= read - bound_inside - bound_before
        bound_before |= _names(statement)[1]
    return free - set(dir(builtins))


T, C, FEATURES, CLASSES, BATCH = 40, 2, 20, 10, 16


def _model(ns):
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(
        nn.Linear(FEATURES, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
        nn.Linear(32, CLASSES),
    )  # fmt: skip


def _loader(ns):
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(CLASSES, FEATURES, generator=g)
    out = []
    for _ in range(T):
        y = torch.randint(0, CLASSES, (BATCH,), generator=g)
        out.append((centers[y] + torch.randn(BATCH, FEATURES, generator=g), y))
    return out


def _evaluate(ns):
    x, y = ns["loader"][0]

    @torch.no_grad()
    def evaluate(model):
        was_training = model.training
        model.eval()
        accuracy = (model(x).argmax(1) == y).float().mean().item()
        model.train(was_training)
        return accuracy

    return evaluate


def _inner(ns):
    return torch.optim.SGD(ns["model"].parameters(), lr=0.1, momentum=0.9)


def _opt(ns):
    from sparseopt import SparseOptimizer

    opt = SparseOptimizer(ns["inner"], "rigl", 0.9, model=ns["model"], seed=0)
    opt.apply_masks()  # as after the first step: the model is sparse
    return opt


def _sched(ns):
    from sparseopt import SupTicketsScheduler

    return SupTicketsScheduler(ns["opt"], total_steps=T, cycle_steps=C)


def _checkpoint(ns):
    """A checkpoint of the stand-ins' run after 5 steps, as the pages save one."""
    run = {"model": _model(ns), "loader": _loader(ns)}
    run["inner"] = _inner(run)
    run["opt"] = _opt(run)
    run["sched"] = _sched(run)
    scaler = torch.amp.GradScaler("cpu")
    for x, y in run["loader"][:5]:
        loss = torch.nn.functional.cross_entropy(run["model"](x), y)
        run["opt"].zero_grad()
        scaler.scale(loss).backward()
        scaler.step(run["opt"])
        scaler.update()
        run["sched"].step()
    state = {key: run[key].state_dict() for key in ("model", "opt", "sched")}
    torch.save(state | {"scaler": scaler.state_dict()}, "checkpoint.pt")
    return Path("checkpoint.pt")


def _ds(ns):
    g = torch.Generator().manual_seed(2)
    return [
        {"input_ids": ids, "labels": ids} for ids in torch.randint(0, 256, (64, 16), generator=g)
    ]


def _module(name):
    def load(ns):
        import importlib

        return importlib.import_module(name)

    return load


def _sparseopt_name(name):
    def load(ns):
        import sparseopt

        return getattr(sparseopt, name)

    return load


# name -> (the names it needs first, factory(namespace) -> value); built in this order.
STAND_INS = {
    "torch": ((), _module("torch")),
    "nn": ((), _module("torch.nn")),
    "F": ((), _module("torch.nn.functional")),
    "sparseopt": ((), _module("sparseopt")),
    "SparseOptimizer": ((), _sparseopt_name("SparseOptimizer")),
    "SupTicketsScheduler": ((), _sparseopt_name("SupTicketsScheduler")),
    "T": ((), lambda ns: T),
    "C": ((), lambda ns: C),
    "A": ((), lambda ns: 2),
    "device": ((), lambda ns: torch.device("cpu")),
    "model": ((), _model),
    "loader": ((), _loader),
    "train_loader": (("loader",), lambda ns: ns["loader"]),
    "x": (("loader",), lambda ns: ns["loader"][0][0]),
    "y": (("loader",), lambda ns: ns["loader"][0][1]),
    "loss_fn": ((), lambda ns: torch.nn.functional.cross_entropy),
    "evaluate": (("loader",), _evaluate),
    "inner": (("model",), _inner),
    "opt": (("model", "inner"), _opt),
    "sched": (("opt",), _sched),
    "scaler": ((), lambda ns: torch.amp.GradScaler("cpu")),
    "path": ((), _checkpoint),
    "ds": ((), _ds),
}


def stand_ins(names: set[str]) -> dict:
    """The stand-ins for ``names``, with what they depend on, in ``STAND_INS`` order."""
    wanted, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo.extend(STAND_INS[name][0])
    ns: dict = {}
    for name, (_, factory) in STAND_INS.items():
        if name in wanted:
            ns[name] = factory(ns)
    return {name: ns[name] for name in names}


# Blocks in pages that other helpers own, which do not run yet: {id: why}. They run as expected
# failures (not strict: a fixed one shows as XPASS) until their pages mark them or make them run;
# then drop the entry (test_pending_entries_name_real_blocks fails on a stale one).
PENDING: dict[str, str] = {}


def _params():
    for block in BLOCKS:
        marks = (
            [pytest.mark.xfail(reason=f"pending: {PENDING[block.id]}")]
            if block.id in PENDING
            else []
        )
        yield pytest.param(block, id=block.id, marks=marks)


@pytest.mark.parametrize("block", list(_params()))
def test_block_runs(block, tmp_path, monkeypatch, request, one_thread, method_registry):
    if block.fragment is not None:
        pytest.skip(f"fragment: {block.fragment}")
    code = resolve_includes(block.code)
    tree = ast.parse(code, filename=block.id)
    free = free_names(tree)
    unknown = sorted(free - STAND_INS.keys())
    assert not unknown, (
        f"{block.id} uses {unknown} without defining them: define them in the block, mark the "
        f"block <!-- fragment: why -->, or add a stand-in to tests/test_docs_blocks.py"
    )
    if "transformers" in code:
        pytest.importorskip("transformers")
    if "transformers" in code or "accelerate" in code:
        request.getfixturevalue("fresh_accelerate_state")  # a process-wide singleton
    monkeypatch.chdir(tmp_path)
    # a module of its own in sys.modules, as a script's __main__ is (dataclasses and pickling
    # look a class's module up there)
    module = types.ModuleType("__docs__")
    module.__dict__.update(stand_ins(free))
    monkeypatch.setitem(sys.modules, "__docs__", module)
    torch.manual_seed(0)
    exec(compile(tree, block.id, "exec"), module.__dict__)


def test_every_fragment_says_why():
    missing = [b.id for b in BLOCKS if b.fragment is not None and not b.fragment]
    assert not missing, f"a fragment marker needs a reason, <!-- fragment: why -->: {missing}"


def test_every_marker_is_right_before_a_python_block():
    stray = {p.name: n for p in PAGES if (n := stray_markers(p))}
    assert not stray, f"fragment markers not directly before a Python fence: {stray}"


def test_pending_entries_name_real_blocks():
    assert set(PENDING) <= {b.id for b in BLOCKS}


def test_the_parser_finds_blocks_markers_and_includes(tmp_path):
    """Negative control for the collection: a page with each kind of block."""
    page = tmp_path / "page.md"
    page.write_text(
        "Text\n\n```python\na = 1\n```\n\n<!-- fragment: needs a GPU -->\n```python\nb = 2\n```\n"
        "\n- item\n\n  ```python\n  c = 3\n  ```\n\n```bash\nd = 4\n```\n\n<!-- fragment -->\n"
        "```text\nnot python\n```\n"
    )
    blocks = parse_blocks(page)
    assert [(b.line, b.code, b.fragment) for b in blocks] == [
        (3, "a = 1", None),
        (8, "b = 2", "needs a GPU"),
        (14, "c = 3", None),
    ]
    assert stray_markers(page) == [22]
    block = (
        "import os\ndef f(a):\n    return a + b\nz = f(model)\nopt, m = wrap(opt, model)\nm.x = z"
    )
    assert free_names(ast.parse(block)) == {"b", "model", "opt", "wrap"}
    (tmp_path / "ex.py").write_text("a = 0\n# --8<-- [start:s]\nb = 1\n# --8<-- [end:s]\nc = 2\n")
    assert resolve_includes("--8<--\nex.py:s\n--8<--", root=tmp_path).strip() == "b = 1"
    assert resolve_includes("--8<--\nex.py\n--8<--", root=tmp_path).startswith("a = 0")
    assert resolve_includes("b = 1  # --8<-- in a comment") == "b = 1  # --8<-- in a comment"
    assert len(BLOCKS) > 30  # the pages were found
