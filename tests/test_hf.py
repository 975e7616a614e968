"""Hugging Face ``transformers.Trainer`` with a ``SparseOptimizer`` and a ``SupTicketsScheduler``.

A tiny GPT-2 built from a config (nothing downloaded) trains on random tokens with gradient
accumulation 2, gradient clipping and checkpoints every 3 optimizer steps (the last two kept).
The reference for a resumed run is the uninterrupted run of the same script: resumed from the
checkpoint at step 9 (mid-cycle: the tickets are consolidated at steps 8, 10 and 12), it must end
bit-identical. The negative control resumes without the optimizer's file and must differ.

Skipped when ``transformers`` is not importable (``pip install sparseopt[hf]``).
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from cases import assert_exactly_equal

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'sparseopt[hf]')"
)

import sparseopt  # noqa: E402
from sparseopt import SparseOptimizer, SupTicketsScheduler  # noqa: E402
from sparseopt.integrations.hf import SparseTrainerCallback, param_groups  # noqa: E402

STEPS, CYCLE, SAVE = 12, 2, 3
SPARSITY = 0.8
CLIP = 0.5


pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


class Tokens(torch.utils.data.Dataset):
    """64 random sequences of 16 tokens; the labels are the inputs (causal LM)."""

    def __init__(self) -> None:
        self.x = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


class Recorder(transformers.TrainerCallback):
    """The dense gradient norm the optimizer sees (after clipping) and the logged norms."""

    def __init__(self, model):
        self.model, self.norms, self.logged = model, [], []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logged.append(dict(logs))


def build(out, *, max_steps=STEPS, total_steps=STEPS, callback=True, **args):
    model = tiny_gpt2()
    inner = torch.optim.AdamW(param_groups(model, weight_decay=0.01), lr=3e-3)
    opt = SparseOptimizer(inner, "rigl", SPARSITY, update_every=2, model=model, seed=0)
    phase1 = total_steps - 3 * CYCLE if total_steps >= 4 * CYCLE else total_steps - CYCLE
    base = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=phase1, eta_min=1e-3)
    sched = SupTicketsScheduler(opt, total_steps, CYCLE, superpose_fraction=0.5, base=base,
                                lr_low=1e-3, lr_high=3e-3)  # fmt: skip
    options = {
        "max_steps": max_steps, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2, "max_grad_norm": CLIP, "save_strategy": "steps",
        "save_steps": SAVE, "save_total_limit": 2, "use_cpu": True, "report_to": [], "seed": 0,
        "logging_steps": 1, "disable_tqdm": True, "dataloader_num_workers": 0, **args,
    }  # fmt: skip
    recorder = Recorder(model)
    callbacks = ([SparseTrainerCallback()] if callback else []) + [recorder]
    trainer = transformers.Trainer(
        model=model,
        args=transformers.TrainingArguments(str(out), **options),
        train_dataset=Tokens(),
        optimizers=(opt, sched),
        callbacks=callbacks,
    )
    return {"model": model, "opt": opt, "sched": sched, "trainer": trainer, "rec": recorder}


@pytest.fixture
def finalize_calls(monkeypatch):
    calls: list[int] = []
    real = SparseOptimizer.finalize

    def spy(self):
        calls.append(self.step_count)
        return real(self)

    monkeypatch.setattr(SparseOptimizer, "finalize", spy)
    return calls


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted run, with its forward passes counted."""
    out = tmp_path_factory.mktemp("full")
    run = build(out)
    forwards = []
    run["model"].register_forward_hook(lambda *_: forwards.append(1))
    finalized = []
    real = SparseOptimizer.finalize
    SparseOptimizer.finalize = lambda self: (finalized.append(self.step_count), real(self))[1]
    try:
        run["trainer"].train()
    finally:
        SparseOptimizer.finalize = real
    return {**run, "out": out, "forwards": len(forwards), "finalized": finalized}


def _state(run):
    """Everything that must match: weights, the whole optimizer state (masks, inner moments,
    counters, generator, superposed copy) and the scheduler's state."""
    return (
        list(run["model"].state_dict().values()),
        run["opt"].state_dict(),
        run["sched"].state_dict(),
    )


def _assert_ticket(opt, model):
    total = sum(layer.numel for layer in opt.layers)
    assert sum(int(layer.mask.sum()) for layer in opt.layers) == round((1 - SPARSITY) * total)
    for layer in opt.layers:
        assert layer.count == int(layer.mask.sum())
        assert bool((layer.param[~layer.mask] == 0).all()), layer.name


def test_trainer_steps_the_scheduler_once_per_optimizer_step(full_run):
    trainer, opt, sched = full_run["trainer"], full_run["opt"], full_run["sched"]
    assert full_run["forwards"] == 2 * STEPS  # accumulation 2: two micro-batches per step
    assert trainer.state.global_step == opt.step_count == sched.last_epoch == STEPS
    assert opt.tickets == 3  # floor(0.5 * 12 / 2), consolidated at 8, 10, 12
    assert full_run["finalized"] == [STEPS]
    _assert_ticket(opt, full_run["model"])
    logged = [log for log in full_run["rec"].logged if "sparsity/density" in log]
    assert len(logged) >= STEPS
    assert logged[-1]["sparsity/tickets"] == 3


def test_gradients_are_clipped_before_the_sparse_step(full_run):
    """The Trainer clips the dense gradient (inactive positions included) before ``step()``."""
    norms = full_run["rec"].norms
    assert len(norms) == STEPS
    assert max(norms) <= CLIP * (1 + 1e-5)
    pre_clip = [log["grad_norm"] for log in full_run["rec"].logged if "grad_norm" in log]
    assert max(pre_clip) > CLIP  # otherwise the clip above would hold vacuously


def test_save_total_limit_and_weights_only_checkpoints(full_run):
    out = full_run["out"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-9"]
    # what Trainer._load_optimizer_and_scheduler does: torch.load(..., weights_only=True)
    saved = torch.load(out / "checkpoint-9" / "optimizer.pt", weights_only=True)
    assert all(m.dtype == torch.bool for m in saved["sparseopt"]["masks"].values())
    sched = torch.load(out / "checkpoint-9" / "scheduler.pt", weights_only=True)
    assert sched["last_epoch"] == 9


def test_resume_mid_cycle_is_bit_identical(full_run, tmp_path):
    resumed = build(tmp_path / "resumed")
    resumed["trainer"].train(resume_from_checkpoint=str(full_run["out"] / "checkpoint-9"))
    assert resumed["opt"].step_count == resumed["sched"].last_epoch == STEPS
    assert resumed["opt"].tickets == 3
    mine, ref = _state(resumed), _state(full_run)
    assert len(mine[0]) == len(ref[0])
    for a, b in zip(mine[0], ref[0], strict=True):
        assert torch.equal(a, b)
    assert mine[1]["sparseopt"]["superposition"] is not None
    # masks, moments, counters, generator, superposed copy
    assert_exactly_equal(mine[1], ref[1], "opt")
    assert_exactly_equal(mine[2], ref[2], "sched")
    _assert_ticket(resumed["opt"], resumed["model"])


def test_resume_without_the_optimizer_state_differs_or_is_refused(full_run, tmp_path):
    """Negative control: the same checkpoint without ``optimizer.pt`` (the Trainer then loads
    neither the optimizer nor the scheduler) ends elsewhere; the callback refuses to start."""
    ckpt = tmp_path / "checkpoint-9"
    shutil.copytree(full_run["out"] / "checkpoint-9", ckpt)
    (ckpt / "optimizer.pt").unlink()
    bare = build(tmp_path / "bare", callback=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bare["trainer"].train(resume_from_checkpoint=str(ckpt))
    mine, ref = _state(bare)[0], _state(full_run)[0]
    assert any(not torch.equal(a, b) for a, b in zip(mine, ref, strict=True))

    checked = build(tmp_path / "checked")
    with pytest.raises(RuntimeError, match="Expected the SparseOptimizer's step_count"):
        checked["trainer"].train(resume_from_checkpoint=str(ckpt))


def test_callback_refuses_a_schedule_longer_than_max_steps(tmp_path):
    run = build(tmp_path, max_steps=STEPS, total_steps=STEPS + 2)
    with pytest.raises(ValueError, match="Expected the SupTicketsScheduler's total_steps"):
        run["trainer"].train()
    assert run["opt"].step_count == 0


def test_bf16_mixed_precision_on_cpu(tmp_path, finalize_calls):
    run = build(tmp_path, max_steps=4, total_steps=4, save_strategy="no", bf16=True)
    dtypes = []
    attn = run["model"].transformer.h[0].attn.c_attn
    attn.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    run["trainer"].train()
    assert set(dtypes) == {torch.bfloat16}  # autocast was on
    assert all(p.dtype == torch.float32 for p in run["model"].parameters())  # fp32 master weights
    assert run["opt"].step_count == run["sched"].last_epoch == 4
    assert finalize_calls == [4]
    _assert_ticket(run["opt"], run["model"])


def test_tied_embedding_is_one_parameter_with_one_mask():
    """By default every 2-D tensor is sparse, the tied ``wte``/``lm_head`` once."""
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    opt = SparseOptimizer(torch.optim.AdamW(model.parameters()), "rigl", 0.9, model=model, seed=0)
    tied = [layer for layer in opt.layers if layer.param is model.lm_head.weight]
    assert len(tied) == 1
    distinct = {id(p) for p in model.parameters() if p.ndim >= 2}
    assert len(opt.layers) == len(opt.masks) == len(distinct) == 10  # wte, wpe, 4 per block
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    mask = tied[0].mask
    assert int((model.lm_head.weight != 0).sum()) <= int(mask.sum()) == tied[0].count
    assert bool((model.lm_head.weight[~mask] == 0).all())


def test_param_groups_make_projections_sparse_and_embeddings_dense():
    model = tiny_gpt2()
    groups = param_groups(model, weight_decay=0.1)
    opt = SparseOptimizer(torch.optim.AdamW(groups), "set", 0.9, model=model, seed=0)
    # independent of param_groups: the names of GPT-2's attention and MLP Conv1D weights
    expected = [
        f"transformer.h.{i}.{part}.weight"
        for i in range(2)
        for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert [layer.name for layer in opt.layers] == expected
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    dense = next(g for g in groups if g["name"] == "embeddings")
    assert dense["sparse"] is False
    assert {id(p) for p in dense["params"]} == {
        id(model.transformer.wte.weight),
        id(model.transformer.wpe.weight),
    }
    assert all(p.ndim == 1 for p in next(g for g in groups if g["name"] == "no_decay")["params"])
    assert opt.param_groups[2]["weight_decay"] == 0.0


def test_param_groups_errors():
    model = torch.nn.ModuleDict({"emb": torch.nn.Embedding(10, 4, sparse=True)})
    with pytest.raises(ValueError, match=r"Expected the embeddings .* but got emb"):
        param_groups(model, sparse_embeddings=True)
    assert param_groups(model)[0]["sparse"] is False  # dense by default: fine
    with pytest.raises(TypeError, match=r"Expected model to be an nn\.Module"):
        param_groups([torch.nn.Parameter(torch.ones(2, 2))])
    with pytest.raises(ValueError, match="Expected weight_decay to be >= 0"):
        param_groups(model, weight_decay=-1.0)
    with pytest.raises(TypeError, match="Expected check_every to be an int"):
        SparseTrainerCallback(check_every=1.5)


def test_callback_counts_skipped_steps_warns_once_on_missing_ones_and_refuses_extra_steps():
    """A step a GradScaler skipped counts for the optimizer (``skipped_steps``) as for the
    Trainer: no warning. A Trainer step that never reached the optimizer: a warning, once; more
    optimizer steps than Trainer steps: an error. No Trainer needed: the state is faked."""
    from types import SimpleNamespace

    model = torch.nn.Linear(4, 4)
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.5, seed=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(model(torch.ones(1, 4)).sum()).backward()
    model.weight.grad[0, 0] = float("inf")
    scaler.step(opt)  # skipped: step_count 0, skipped_steps 1
    scaler.update()
    checked = SparseTrainerCallback()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = SimpleNamespace(global_step=1, max_steps=5)
        checked.on_train_begin(None, state, None, optimizer=opt)
        checked.on_step_end(None, state, None)
    opt.zero_grad()
    model(torch.ones(1, 4)).sum().backward()
    opt.step()  # step_count 1: two iterations
    callback = SparseTrainerCallback()
    callback.on_train_begin(None, SimpleNamespace(global_step=2, max_steps=5), None, optimizer=opt)
    with pytest.warns(UserWarning, match="made 2 steps in the Trainer's 3") as caught:
        callback.on_step_end(None, SimpleNamespace(global_step=3), None)
    assert caught[0].filename == __file__  # the user's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback.on_step_end(None, SimpleNamespace(global_step=4), None)  # once only
    with pytest.raises(RuntimeError, match="Expected the SparseOptimizer's step_count"):
        callback.on_step_end(None, SimpleNamespace(global_step=0), None)


def test_sparse_gradient_embedding_in_a_sparse_group_is_refused_clearly():
    """The first step refuses a sparse-layout gradient, before any weight changes."""
    emb = torch.nn.Embedding(50, 8, sparse=True)

    def build_and_step():
        opt = SparseOptimizer(torch.optim.SGD(emb.parameters(), lr=0.1), "rigl", 0.5, seed=0)
        emb(torch.tensor([1, 2])).sum().backward()
        opt.step()

    before = emb.weight.detach().clone()
    with pytest.raises(TypeError, match=r"Expected a dense \(strided\) gradient.*sparse=True"):
        build_and_step()
    assert torch.equal(emb.weight, before)


def test_a_parameter_listed_twice_gets_one_mask():
    """A tensor listed twice (torch only warns) is one sparse layer with one exact count."""
    w = torch.nn.Parameter(torch.randn(6, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = SparseOptimizer(torch.optim.SGD([w, w], lr=0.1), "set", 0.5, seed=0)
    w.sum().backward()
    opt.step()
    assert len(opt.layers) == 1
    assert sum(layer.count for layer in opt.layers) == int(opt.masks[w].sum())


def test_sparseopt_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, sparseopt; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert sparseopt.__version__
