"""FSDP2: sharded masks, selections across shards, and a run equal to a single-process run.

Two processes shard an MLP with ``fully_shard`` (DTensor parameters, ``Shard(0)``, uneven shards)
and train it with the same ``seed=``; the result must equal a single-process run on the
concatenated batches: the gathered masks bit for bit, the weights within float tolerance (the
gradient of the whole batch is the mean of the two half-batch gradients). One process group runs
every case, in a fresh interpreter, and the tests read what it saved (moved to the CPU). With
``--device cuda`` and two GPUs the ranks run on NCCL over a ``cuda`` mesh, one on ``cuda:0`` and
one on ``cuda:1``, and the single-process run on ``cuda:0``; otherwise (the CPU, or one GPU) both
are gloo on the CPU, and so is the reference.

On the CPU, torch's own FSDP2 sets a floor below sparseopt's: torch 2.6's ``fully_shard`` does
not run on gloo at all, and torch 2.7's HSDP all-reduces with ``ReduceOp.AVG``, which gloo lacks.
The tests skip what torch cannot run there and say so (``gloo_gaps``).
"""

from __future__ import annotations

import sys
from inspect import signature

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from cases import assert_exactly_equal, first_difference, mlp
from packaging.version import Version
from ranks import rank_device, run_ranks, spawn, to_cpu
from torch import nn

from sparseopt import SparseOptimizer, SupTicketsScheduler
from sparseopt.masks import count_active, drop_and_grow, select_largest_across, select_smallest

STEPS, CYCLE, BATCH, RESUME_AT = 24, 3, 16, 22

# (method, inner optimizer, Sup-tickets re-prune): SET and GraNet re-prune globally across shards.
CASES = {
    "static": ("static", "sgd", "layer"),
    "set": ("set", "sgd", "global"),
    "rigl": ("rigl", "adam", "layer"),
    "granet": ("granet", "sgd", "global"),
    "snip": ("snip", "sgd", "layer"),
}
MESHES = {"hsdp-2x1": (2, 1), "hsdp-1x2": (1, 2)}  # (replicate, shard) meshes for RigL


def gloo_gaps(device_type: str) -> dict[str, str]:
    """What torch's FSDP2 cannot run on gloo ranks on the CPU, by this torch: {part: reason}."""
    release = Version(Version(torch.__version__).base_version)
    if device_type != "cpu":
        return {}
    if release < Version("2.7"):
        return {"fsdp2": f"torch {torch.__version__}'s fully_shard does not run on the CPU "
                         "(no Stream.record_event); run on two GPUs or torch >= 2.7"}  # fmt: skip
    if release < Version("2.8"):
        return {"hsdp": f"torch {torch.__version__}'s HSDP all-reduces with ReduceOp.AVG, "
                        "which gloo lacks; run on two GPUs or torch >= 2.8"}  # fmt: skip
    return {}


def _model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return mlp(12, 33, 31, 4, device=device)


def _data(device: torch.device):
    """Drawn on the CPU, then moved: the same batches on every device."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, 2 * BATCH, 12, generator=gen)
    y = torch.randint(0, 4, (STEPS, 2 * BATCH), generator=gen)
    return x.to(device), y.to(device)


def _build(model, case):
    method, inner, reprune = CASES[case]
    if inner == "adam":
        base = torch.optim.Adam(model.parameters(), lr=0.01)
    else:
        base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    opt = SparseOptimizer(
        base,
        method,
        0.8,
        update_every=2,
        model=model,
        seed=0,
        **({"prune_end": 0.4} if method == "granet" else {}),
    )
    sched = SupTicketsScheduler(
        opt, STEPS, CYCLE, superpose_fraction=0.3, lr_low=0.01, lr_high=0.05, reprune=reprune
    )
    return opt, sched


def _train(model, opt, sched, shard, device, start=0, stop=STEPS, loss_scale=1.0):
    """Train steps ``start..stop-1``; from the first ticket on, evaluate the superposed and the
    live weights every other step (forward passes with no backward in between)."""
    xs, ys = _data(device)
    evals = []
    for t in range(start, stop):
        loss = F.cross_entropy(model(shard(xs[t])), shard(ys[t])) * loss_scale
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if dist.is_initialized() and t % 6 == 5:
            opt.check_consistency()
        if opt.tickets and t % 2 == 0:
            with torch.no_grad():
                with opt.superposed():
                    evals.append(model(xs[0]))
                evals.append(model(xs[0]))
    return evals


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _snapshot(model, opt, evals):
    with torch.no_grad(), opt.superposed():
        superposed = [_full(p.detach()).clone() for p in model.parameters()]
    return {
        "masks": [_full(layer.mask) for layer in opt.layers],
        "params": [_full(p.detach()) for p in model.parameters()],
        "superposed": superposed,
        "counts": [layer.count for layer in opt.layers],
        "recounted": count_active([layer.mask for layer in opt.layers]),
        "report_nnz": opt.report()["total"]["nnz"],
        "density": opt.density,
        "tickets": opt.tickets,
        "evals": evals,
        "local_masks": [layer.mask.to_local().clone() for layer in opt.layers],
        "local_params": [p.detach().to_local().clone() for p in model.parameters()],
    }


# --- selections on DTensors against the single-process functions -------------------------------
SHAPES = [(1, 5), (7, 3), (33, 12), (5,)]


def _scores(shape, dtype, kind, gen):
    if kind == "ties":
        x = torch.randint(-3, 4, shape, generator=gen).to(torch.float64)
        flat = x.view(-1)
        flat[torch.randperm(flat.numel(), generator=gen)[:3]] = float("inf")
        flat[torch.randperm(flat.numel(), generator=gen)[:2]] = float("-inf")
        flat[torch.randperm(flat.numel(), generator=gen)[:2]] = -0.0
        flat[torch.randperm(flat.numel(), generator=gen)[:2]] = float("nan")  # the worst score
    else:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x.to(dtype)


def _selection_results(mesh, device):
    from torch.distributed.tensor import Shard, distribute_tensor

    # Every rank holds the same ``t``: each keeps its chunk, with no broadcast where torch can
    # skip it (``src_data_rank``, torch >= 2.7).
    skip = (
        {"src_data_rank": None}
        if "src_data_rank" in signature(distribute_tensor).parameters
        else {}
    )

    def shard(t):
        return distribute_tensor(t, mesh, [Shard(0)], **skip)

    gen = torch.Generator().manual_seed(5)
    out = []
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for kind in ("ties", "distinct"):
            for shape in SHAPES:
                x = _scores(shape, dtype, kind, gen).to(device)
                n = x.numel()
                for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
                    got = _full(select_smallest(shard(x), k))
                    out.append(("smallest", dtype, kind, shape, k, got, select_smallest(x, k)))
            xs = [_scores(s, dtype, kind, gen).to(device) for s in SHAPES]
            xs[1] = xs[1].double()  # mixed dtypes promote as torch.cat does
            n = sum(x.numel() for x in xs)
            for k in (0, 1, n // 4, n // 2, n - 1, n):
                got = [_full(m) for m in select_largest_across([shard(x) for x in xs], k)]
                ref = select_largest_across(xs, k)
                out.append(("largest_across", dtype, kind, len(xs), k, got, ref))
    # drop_and_grow with many tied gradients (RigL's dead units) and a few exact |w| ties.
    mask = torch.rand(33, 12, generator=gen) < 0.3
    w = torch.randint(-4, 5, (33, 12), generator=gen).float() * mask
    g = torch.randint(0, 3, (33, 12), generator=gen).float()
    mask, w, g = mask.to(device), w.to(device), g.to(device)
    for k in (0, 5, 40, int(mask.sum())):
        got = [_full(t) for t in drop_and_grow(shard(mask), shard(w.abs()), shard(g), k)]
        ref = list(drop_and_grow(mask, w.abs(), g, k))
        out.append(("drop_and_grow", torch.float32, "ties", (33, 12), k, got, ref))
    return out


def _collectives_per_step(model, shard, device):
    """The collectives each ``opt.step()`` of SET (``update_every=2``) issues, by kind."""
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), "set", 0.8,
                          update_every=2, total_steps=20, seed=0)  # fmt: skip
    names = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter")
    calls: list[str] = []
    originals = {name: getattr(dist, name) for name in names}

    def counting(name):
        def call(*args, **kwargs):
            calls.append(name)
            return originals[name](*args, **kwargs)

        return call

    xs, ys = _data(device)
    per_step = []
    for t in range(6):
        F.cross_entropy(model(shard(xs[t])), shard(ys[t])).backward()
        for name in names:
            setattr(dist, name, counting(name))
        try:
            opt.step()
        finally:
            for name in names:
                setattr(dist, name, originals[name])
        opt.zero_grad()
        per_step.append(list(calls))
        calls.clear()
    return per_step


def _errors(mesh, device):
    """Messages of the errors for unsupported layouts and mixed selections."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    out = {}
    model = nn.Sequential(nn.Linear(12, 6), nn.Linear(6, 4))  # FSDP2 shards dim 1 only evenly
    fully_shard(model, mesh=mesh, shard_placement_fn=lambda p: Shard(p.ndim - 1))
    try:
        SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.8, model=model)
    except ValueError as e:
        out["placement"] = str(e)
    x = torch.arange(12.0).view(4, 3).to(device)
    try:
        select_largest_across([distribute_tensor(x, mesh, [Shard(0)]), x], 3)
    except ValueError as e:
        out["mixed"] = str(e)
    return out


def _gradient_scale(model: nn.Module, shard, device: torch.device) -> float:
    """The gradient FSDP2 gives ``model`` over the gradient of the mean over the whole batch.

    1 where torch averages the ranks' gradients, as DDP does; 2 where it sums them: torch 2.7
    and 2.8's FSDP2 on gloo (a torch bug, fixed in 2.9, seen without sparseopt).
    """
    ref = _model(device)
    xs, ys = _data(device)
    F.cross_entropy(model(shard(xs[0])), shard(ys[0])).backward()
    F.cross_entropy(ref(xs[0]), ys[0]).backward()
    return round(float(_full(model[0].weight.grad).norm() / ref[0].weight.grad.norm()), 3)


def _ranks(rank: int, world: int, out: str, device: torch.device) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))

    def sharded_model(device_mesh=mesh):
        model = _model(device)
        for i, layer in enumerate(model):
            if isinstance(layer, nn.Linear):  # the last stays unsharded between forward passes
                fully_shard(layer, mesh=device_mesh, reshard_after_forward=i < len(model) - 1)
        fully_shard(model, mesh=device_mesh)
        return model

    def batch_shard(t):
        return t.chunk(world)[rank]

    results = {"selection": _selection_results(mesh, device)}
    results["gradient_scale"] = {"fsdp": _gradient_scale(sharded_model(), batch_shard, device)}
    for case in CASES:
        model = sharded_model()
        opt, sched = _build(model, case)
        first = _train(model, opt, sched, batch_shard, device, stop=RESUME_AT)
        ckpt = f"{out}/{case}-rank{rank}.pt"
        torch.save(
            {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()},
            ckpt,
        )
        evals = first + _train(model, opt, sched, batch_shard, device, start=RESUME_AT)
        opt.check_consistency()
        results[case] = _snapshot(model, opt, evals)

        # Resume from the checkpoint in a fresh sharded model and optimizer.
        torch.manual_seed(99)
        model = sharded_model()
        opt, sched = _build(model, case)
        saved = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        evals = first + _train(model, opt, sched, batch_shard, device, start=RESUME_AT)
        results[f"{case}-resumed"] = _snapshot(model, opt, evals)

    for name, shape in MESHES.items() if "hsdp" not in gloo_gaps(device.type) else ():
        hsdp = init_device_mesh(device.type, shape, mesh_dim_names=("replicate", "shard"))
        results["gradient_scale"][name] = _gradient_scale(sharded_model(hsdp), batch_shard, device)
        model = sharded_model(hsdp)
        opt, sched = _build(model, "rigl")
        evals = _train(model, opt, sched, batch_shard, device)
        opt.check_consistency()
        results[name] = _snapshot(model, opt, evals)

    results["collectives"] = _collectives_per_step(sharded_model(), batch_shard, device)
    results["errors"] = _errors(mesh, device)

    # What a checkpoint holds; the other rank's (uneven shards) and a single-process one
    # do not load, and leave the optimizer as it was.
    model = sharded_model()
    opt, _ = _build(model, "set")
    before = [layer.mask.to_local().clone() for layer in opt.layers]
    mine = torch.load(f"{out}/set-rank{rank}.pt", map_location=device, weights_only=True)["opt"]
    results["saved_types"] = sorted(
        {type(m).__name__ for m in mine["sparseopt"]["masks"].values()}
        | {type(v).__name__ for st in mine["state"].values() for v in st.values()}
    )
    other = torch.load(f"{out}/set-rank{1 - rank}.pt", map_location=device, weights_only=True)
    other = other["opt"]
    plain_model = _model(device)
    single = _build(plain_model, "set")[0].state_dict()
    for key, sd in (("wrong_rank_error", other), ("plain_error", single)):
        try:
            opt.load_state_dict(sd)
        except ValueError as e:
            results[key] = str(e)
    results["unchanged"] = (
        first_difference(before, [m.to_local() for m in opt.masks.values()]) is None
    )
    results["state_untouched"] = len(opt.state) == 0

    # Different seeds: the generators differ (and so would every random mask shard).
    model = sharded_model()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.8,
                          model=model, seed=rank)  # fmt: skip
    try:
        opt.check_consistency()
    except RuntimeError as e:
        results["seed_error"] = str(e)

    # A shard whose mask no longer matches the global count is caught.
    model = sharded_model()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.8,
                          model=model, seed=0)  # fmt: skip
    if rank == 1:
        local = opt.layers[0].mask.to_local()
        local.view(-1)[local.view(-1).nonzero()[0]] = False
    try:
        opt.check_consistency()
    except RuntimeError as e:
        results["count_error"] = str(e)
    torch.save(to_cpu(results), f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory, dist_device_type):
    """Spawn the two ranks from a fresh interpreter, isolated from this pytest process."""
    if "fsdp2" in (gaps := gloo_gaps(dist_device_type)):
        pytest.skip(gaps["fsdp2"])
    out = tmp_path_factory.mktemp("fsdp2")
    run_ranks(__file__, out, dist_device_type)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_selections_on_dtensors_equal_the_single_process_ones(fsdp_results):
    cases = fsdp_results[0]["selection"]
    assert len(cases) == 172  # 6 x (22 single + 6 global selections) + 4 drop_and_grow
    for (what, dtype, kind, shape, k, got, ref), other in zip(
        cases, fsdp_results[1]["selection"], strict=True
    ):
        where = repr((what, dtype, kind, shape, k))
        assert_exactly_equal(got, ref, where)
        assert_exactly_equal(other[5], ref, where)


def _single_process(case, device, loss_scale=1.0):
    """The run on one process on ``device``; the weights, superposed copy and evaluations on the
    CPU (as the ranks saved theirs). ``loss_scale``: the ranks' gradient scale."""
    model = _model(device)
    opt, sched = _build(model, case)
    evals = _train(model, opt, sched, lambda t: t, device, loss_scale=loss_scale)
    with torch.no_grad(), opt.superposed():
        superposed = [p.detach().cpu().clone() for p in model.parameters()]
    params = [p.detach().cpu() for p in model.parameters()]
    return params, opt, superposed, to_cpu(evals)


@pytest.mark.parametrize("case", [*CASES, *MESHES])
def test_fsdp2_run_equals_a_single_process_run(fsdp_results, dist_device_type, case):
    if case in MESHES and "hsdp" in (gaps := gloo_gaps(dist_device_type)):
        pytest.skip(gaps["hsdp"])
    r0, r1 = (r[case] for r in fsdp_results)
    for a, b in zip(r0["masks"] + r0["params"], r1["masks"] + r1["params"], strict=True):
        assert torch.equal(a, b)
    assert r0["tickets"] == 2

    device = rank_device(dist_device_type, 0)  # where rank 0 ran
    scale = fsdp_results[0]["gradient_scale"][case if case in MESHES else "fsdp"]
    params, opt, superposed, evals = _single_process(
        "rigl" if case in MESHES else case, device, loss_scale=scale
    )
    for mask, layer in zip(r0["masks"], opt.layers, strict=True):
        assert torch.equal(mask, layer.mask.cpu())
    counts = [int(layer.mask.sum()) for layer in opt.layers]
    for r in (r0, r1):
        assert r["counts"] == r["recounted"] == counts
        assert r["report_nnz"] == sum(counts) == opt.report()["total"]["nnz"]
        assert r["density"] == opt.density
    assert sum(counts) == round(0.2 * sum(layer.numel for layer in opt.layers))
    for p_fsdp, p in zip(r0["params"], params, strict=True):
        torch.testing.assert_close(p_fsdp, p, rtol=1e-6, atol=1e-7)
    for s_fsdp, s in zip(r0["superposed"], superposed, strict=True):
        torch.testing.assert_close(s_fsdp, s, rtol=1e-6, atol=1e-7)
        if s.ndim >= 2:  # the superposed support is the same too
            assert torch.equal(s_fsdp != 0, s != 0)
    assert len(evals) == len(r0["evals"]) == 4  # superposed and live, after steps 21 and 23
    for e_fsdp, e in zip(r0["evals"], evals, strict=True):
        torch.testing.assert_close(e_fsdp, e, rtol=1e-6, atol=1e-7)


def test_fsdp2_averages_the_gradients_except_where_torch_sums_them(fsdp_results, dist_device_type):
    """The scale the single-process reference copies: 1 (the mean, as DDP), except torch 2.7 and
    2.8's FSDP2 on gloo, which sums the gradients it reduce-scatters across shards (2); HSDP's
    all-reduce across replicas averages (``hsdp-2x1``: two replicas of one shard)."""
    release = Version(Version(torch.__version__).base_version)
    sums = dist_device_type == "cpu" and Version("2.7") <= release < Version("2.9")
    for r in fsdp_results:
        for mesh, scale in r["gradient_scale"].items():
            assert scale == (2.0 if sums and mesh != "hsdp-2x1" else 1.0), (mesh, scale)


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_resume_is_bit_identical(fsdp_results, case):
    for r in fsdp_results:
        done, resumed = r[case], r[f"{case}-resumed"]
        for key in ("local_masks", "local_params", "superposed", "evals"):
            assert_exactly_equal(done[key], resumed[key], key)
        assert done["counts"] == resumed["counts"]


def test_a_checkpoint_holds_dtensors_and_loads_only_where_it_fits(fsdp_results):
    rows = {0: "(17, 12)", 1: "(16, 12)"}  # 33 rows in two chunks
    for rank, r in enumerate(fsdp_results):
        assert r["saved_types"] == ["DTensor"]  # masks and momentum: this rank's shards
        message = r["wrong_rank_error"]
        assert f"a local shard of shape {rows[1 - rank]} does not fit this rank's shard" in message
        assert f"{rows[rank]} of a tensor of shape (33, 12)" in message
        assert "loads only on the rank that saved it" in message
        plain = r["plain_error"]
        assert "Expected a DTensor of shape (33, 12) for this DTensor parameter, but" in plain
        assert r["unchanged"]
        assert r["state_untouched"]


def test_no_collective_on_steps_without_a_topology_update(fsdp_results):
    for r in fsdp_results:
        steps = r["collectives"]
        assert steps[0] == steps[2] == steps[4] == []  # steps 1, 3, 5
        for calls in (steps[1], steps[3], steps[5]):  # updates: finiteness, radix rounds, counts
            assert set(calls) <= {"all_reduce", "all_gather"}
            # 3 layers x 2 selections x (at most 4 rounds + 1 tie gather), plus 2
            assert 2 + 6 <= len(calls) <= 2 + 3 * 2 * 5


def test_unsupported_layouts_and_mixed_selections_are_refused(fsdp_results):
    errors = fsdp_results[0]["errors"]
    assert "Expected 0.weight to be a DTensor sharded on dim 0" in errors["placement"]
    assert "Shard(dim=1)" in errors["placement"]
    assert "all DTensors or all plain tensors" in errors["mixed"]


def test_check_consistency_under_fsdp2(fsdp_results):
    for r in fsdp_results:
        assert "rank 0 and rank 1 at generator" in r["seed_error"]
        assert "the 2 shards of 0.weight hold" in r["count_error"]


if __name__ == "__main__":
    spawn(_ranks, sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "cpu")
