"""Export: the compact sparse checkpoint (save_sparse/load_sparse) and sparse inference modules."""

from __future__ import annotations

import copy
import os
import sys
import warnings

import pytest
import torch
from cases import batches, make_model, mlp, train_step
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparseopt.export as ex
from sparseopt import (
    SparseOptimizer,
    SupTicketsScheduler,
    load_sparse,
    save_sparse,
    to_sparse_inference,
)
from sparseopt.structure import check_structured, random_structured, select_structured

METHODS = ["static", "set", "rigl", "granet", "gmp", "snip"]


def _bits(sd):
    """Each tensor of a state_dict as (dtype, shape, raw bytes): equal means bit-identical."""
    out = {}
    for k, v in sd.items():
        flat = v.detach().contiguous().reshape(-1).view(torch.uint8)
        out[k] = (v.dtype, tuple(v.shape), flat.numpy().tobytes())
    return out


def _trained(kind: str, method: str, steps: int = 12, sparsity: float = 0.8):
    model = make_model(kind)
    opt = SparseOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4),
        method,
        sparsity,
        model=model,
        update_every=3,
        total_steps=steps,
        seed=0,
    )
    for batch in batches(kind, steps):
        train_step(model, opt, batch)
    return model, opt


def _scrambled(model):
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for t in fresh.state_dict().values():
            if t.is_floating_point():
                t.normal_()
            else:
                t.add_(7)
    return fresh


def _without_safetensors(monkeypatch):
    """As if safetensors were not installed: its import fails."""
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)


@pytest.fixture(params=[True, False], ids=["safetensors", "torch-fallback"])
def backend(request, monkeypatch):
    if request.param:
        pytest.importorskip("safetensors")
    else:
        _without_safetensors(monkeypatch)
    return request.param


# --- round trip ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "convnet"])
@pytest.mark.parametrize("method", METHODS)
def test_round_trip_is_bit_exact_with_the_optimizers_masks(kind, method, tmp_path, backend):
    model, opt = _trained(kind, method)
    path = tmp_path / "m.sparse"
    info = save_sparse(model, path, masks=opt.masks, zero_signs=True)
    assert info["format"] == ("safetensors" if backend else "torch")
    fresh = _scrambled(model)
    masks = load_sparse(fresh, path)
    assert _bits(fresh.state_dict()) == _bits(model.state_dict())
    names = {p: n for n, p in model.named_parameters()}
    assert {names[p] for p in opt.masks} == set(masks)
    for p, m in opt.masks.items():
        assert torch.equal(masks[names[p]], m)


@pytest.mark.filterwarnings("ignore:the learning rate at the end of phase 1")
@pytest.mark.parametrize("method", ["set", "rigl"])
def test_round_trip_of_the_sup_tickets_ultimate_ticket(method, tmp_path):
    model = make_model("convnet")
    opt = SparseOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        method,
        0.9,
        model=model,
        update_every=4,
        total_steps=24,
        seed=0,
    )
    sched = SupTicketsScheduler(opt, total_steps=24, cycle_steps=4, superpose_fraction=0.5)
    for batch in batches("convnet", 24):
        train_step(model, opt, batch)
        sched.step()
    opt.finalize()
    path = tmp_path / "ticket.sparse"
    save_sparse(model, path, masks=opt.masks, zero_signs=True)
    fresh = _scrambled(model)
    masks = load_sparse(fresh, path)
    assert _bits(fresh.state_dict()) == _bits(model.state_dict())
    assert sum(int(m.sum()) for m in masks.values()) == opt.report()["total"]["nnz"]


def test_without_zero_signs_inactive_zeros_load_as_plus_zero(tmp_path):
    model, opt = _trained("mlp", "set")
    negative = sum(int((torch.signbit(p) & (p == 0)).sum()) for p in opt.masks)
    assert negative > 0, "masking left no -0.0: the test shows nothing"
    small = save_sparse(model, tmp_path / "a", masks=opt.masks)["file_bytes"]
    exact = save_sparse(model, tmp_path / "b", masks=opt.masks, zero_signs=True)["file_bytes"]
    assert small < exact
    fresh = _scrambled(model)
    load_sparse(fresh, tmp_path / "a")
    for (name, a), b in zip(fresh.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
        assert not bool((torch.signbit(a) & (a == 0)).any()) or a.ndim < 2


def test_active_zeros_are_kept_only_with_masks(tmp_path):
    model, opt = _trained("mlp", "static")
    p = next(iter(opt.masks))
    name = {q: n for n, q in model.named_parameters()}[p]
    idx = torch.nonzero(opt.masks[p])[:3]
    with torch.no_grad():
        p[tuple(idx.t())] = 0.0  # active but exactly 0
    with_masks = load_sparse(_scrambled(model), _saved(model, tmp_path / "a", opt.masks))
    assert torch.equal(with_masks[name], opt.masks[p])
    # the negative control: from the nonzeros alone, the zero weights are not active
    by_value = load_sparse(_scrambled(model), _saved(model, tmp_path / "b", None))
    assert int(by_value[name].sum()) == int(opt.masks[p].sum()) - 3
    by_name = load_sparse(_scrambled(model), _saved(model, tmp_path / "c", {name: opt.masks[p]}))
    assert torch.equal(by_name[name], opt.masks[p])


def _saved(model, path, masks):
    save_sparse(model, path, masks=masks)
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dtypes_and_buffers_round_trip(dtype, tmp_path, backend):
    model, _ = _trained("convnet", "set", sparsity=0.9)
    model = model.to(dtype)
    model.register_buffer("counter", torch.tensor([3, 4], dtype=torch.int32))
    path = tmp_path / "m"
    info = save_sparse(model, path, zero_signs=True)
    assert info["tensors"]["0.weight"]["encoding"] in ("gaps", "bitmask")
    assert info["tensors"]["1.num_batches_tracked"]["encoding"] == "dense"
    fresh = _scrambled(model)
    load_sparse(fresh, path)
    assert _bits(fresh.state_dict()) == _bits(model.state_dict())


@pytest.mark.parametrize("density", [0.002, 0.05, 0.3, 0.95])
def test_position_encodings_round_trip_and_the_smaller_is_chosen(density, tmp_path, backend):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(3001, generator=g) < density
    mask[-1] = True
    model = nn.Module()
    model.w = nn.Parameter(torch.randn(3001, generator=g) * mask)
    info = save_sparse(model, tmp_path / "m", masks={"w": mask})
    # by hand: one bit per weight, or one byte per active weight plus one per 255 skipped
    bitmask = (mask.numel() + 7) // 8
    previous, gaps = -1, 0
    for i in torch.nonzero(mask)[:, 0].tolist():
        gaps += 1 + (i - previous - 1) // 255
        previous = i
    assert info["tensors"]["w"]["encoding"] == ("gaps" if gaps < bitmask else "bitmask")
    fresh = nn.Module()
    fresh.w = nn.Parameter(torch.zeros(3001))
    assert torch.equal(load_sparse(fresh, tmp_path / "m")["w"], mask)
    assert torch.equal(fresh.w, model.w)


def test_file_is_much_smaller_than_torch_save(tmp_path):
    model = mlp(512, 512, 512)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.mul_(torch.rand(512, 512) < 0.05)
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    info = save_sparse(model, tmp_path / "m")
    assert info["file_bytes"] < 0.1 * os.path.getsize(tmp_path / "dense.pt")


def test_nothing_gained_warns(tmp_path):
    with pytest.warns(UserWarning, match="nothing was gained"):
        save_sparse(nn.Linear(8, 8), tmp_path / "m")
    with pytest.warns(UserWarning, match="nothing was gained"):
        to_sparse_inference(nn.Linear(8, 8))


# --- refusals ------------------------------------------------------------------------------------
def _assert_unchanged(model, before):
    assert _bits(model.state_dict()) == before


@pytest.mark.parametrize(
    ("other", "match"),
    [
        (lambda: mlp(8, 16, 16), "missing|not in"),
        (lambda: make_model("mlp").double(), "dtype"),
        (lambda: mlp(8, 16, 16, 5), r"4\.weight: shape \[4, 16\] in the file, \[5, 16\]"),
    ],
)
def test_a_file_that_does_not_fit_is_refused_before_any_change(other, match, tmp_path):
    model, opt = _trained("mlp", "set")
    save_sparse(model, tmp_path / "m", masks=opt.masks)
    target = other()
    before = _bits(target.state_dict())
    with pytest.raises(ValueError, match=match):
        load_sparse(target, tmp_path / "m")
    _assert_unchanged(target, before)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_a_corrupted_or_truncated_file_is_refused(damage, tmp_path, backend):
    model, opt = _trained("mlp", "set")
    path = tmp_path / "m"
    save_sparse(model, path, masks=opt.masks)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "flip":
        data[-50] ^= 0x10  # inside the last tensor's bytes
    elif damage == "garbage":
        data = bytearray(b"\x00" * 64)
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    target = _scrambled(model)
    before = _bits(target.state_dict())
    with pytest.raises(ValueError, match=r"sparse checkpoint|corrupted|readable"):
        load_sparse(target, path)
    _assert_unchanged(target, before)


def test_a_torch_file_with_code_is_not_executed(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"header": {"format": "x"}, "tensors": Boom()}, tmp_path / "evil")
    with pytest.raises(ValueError, match="not a readable sparse checkpoint"):
        load_sparse(nn.Linear(2, 2), tmp_path / "evil")
    assert not (tmp_path / "pwned").exists()


def test_bad_arguments(tmp_path):
    model, opt = _trained("mlp", "set")
    with pytest.raises(TypeError, match=r"Expected model to be an nn\.Module, but got"):
        save_sparse(object(), tmp_path / "m")
    with pytest.raises(TypeError, match="Expected masks to be a mapping"):
        save_sparse(model, tmp_path / "m", masks=[1])
    with pytest.raises(ValueError, match="Expected masks to hold tensors of the model"):
        save_sparse(model, tmp_path / "m", masks={torch.zeros(2): torch.ones(2, dtype=torch.bool)})
    p = next(iter(opt.masks))
    with pytest.raises(TypeError, match="bool tensor of shape"):
        save_sparse(model, tmp_path / "m", masks={p: opt.masks[p].float()})
    with pytest.raises(ValueError, match="outside its mask to be 0, but got"):
        save_sparse(model, tmp_path / "m", masks={p: torch.zeros_like(opt.masks[p])})
    with pytest.raises(TypeError, match=r"Expected model to be an nn\.Module"):
        load_sparse("model", tmp_path / "m")
    with pytest.raises(TypeError, match="Expected model"):
        to_sparse_inference(None)
    with pytest.raises(ValueError, match=r"Expected min_sparsity in \[0, 1\], but got 2"):
        to_sparse_inference(model, min_sparsity=2)
    with pytest.raises(TypeError, match="Expected min_sparsity to be a real number"):
        to_sparse_inference(model, min_sparsity="0.9")
    with pytest.raises(ValueError, match=r"Expected layout in \('csr', 'bsr'\), but got 'coo'"):
        to_sparse_inference(model, layout="coo")
    with pytest.raises(ValueError, match="Expected batch_size to be a positive int, but got 0"):
        to_sparse_inference(model, batch_size=0)
    with pytest.raises(TypeError, match=r"Expected batch_size to be an int, but got 1\.0 \(float"):
        to_sparse_inference(model, batch_size=1.0)


def test_save_into_a_missing_folder_names_the_path_and_leaves_nothing(tmp_path, backend):
    model, opt = _trained("mlp", "set")
    path = tmp_path / "missing" / "deeper" / "model.sparse"
    with pytest.raises(FileNotFoundError) as e:
        save_sparse(model, path, masks=opt.masks)
    message = str(e.value)
    assert repr(str(path)) in message  # the user's path
    assert f"{str(tmp_path / 'missing')!r} does not exist" in message  # the folder missing
    assert ".tmp" not in message
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match=r"'.*file' is a file, not a folder"):
        save_sparse(model, tmp_path / "file" / "m.sparse", masks=opt.masks)
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError, match=r"path to be a file to write, but '.*folder'"):
        save_sparse(model, tmp_path / "folder", masks=opt.masks)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]  # nothing left
    assert list((tmp_path / "folder").iterdir()) == []


def test_a_failed_save_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    model, opt = _trained("mlp", "set")
    path = tmp_path / "model.sparse"
    save_sparse(model, path, masks=opt.masks)
    before = path.read_bytes()

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", src)

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(PermissionError, match=rf"cannot write {str(path)!r}: Permission denied"):
        save_sparse(model, path, masks=opt.masks)
    assert [p.name for p in tmp_path.iterdir()] == ["model.sparse"]
    assert path.read_bytes() == before


# --- sparse inference ----------------------------------------------------------------------------
def _sparsify(module, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = module.weight
        w.mul_(torch.rand(w.shape, generator=g) >= sparsity)


@settings(max_examples=25, deadline=None)
@given(
    out_f=st.integers(1, 48),
    in_f=st.integers(1, 48),
    lead=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    sparsity=st.floats(0.0, 1.0),
    bias=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_sparse_linear_equals_dense(out_f, in_f, lead, sparsity, bias, seed):
    torch.manual_seed(seed)
    dense = nn.Linear(in_f, out_f, bias=bias)
    _sparsify(dense, sparsity, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = to_sparse_inference(dense, min_sparsity=0.0)
    assert isinstance(fast, ex.SparseLinear)
    x = torch.randn(*lead, in_f)
    torch.testing.assert_close(fast(x), dense(x), rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    c_out=st.integers(1, 24),
    c_in=st.integers(1, 24),
    n=st.integers(1, 3),
    hw=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    sparsity=st.floats(0.0, 1.0),
    bias=st.booleans(),
    layout=st.sampled_from(["csr", "bsr"]),
    seed=st.integers(0, 1000),
)
def test_sparse_conv1x1_equals_dense(c_out, c_in, n, hw, sparsity, bias, layout, seed):
    torch.manual_seed(seed)
    if layout == "bsr":
        c_out, c_in = 2 * c_out, 2 * c_in
    model = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=bias), nn.ReLU())
    _sparsify(model[0], sparsity, seed)
    fast = to_sparse_inference(model, min_sparsity=0.0, layout=layout)
    assert fast.sparse_inference_report.converted == ["0"]
    x = torch.randn(n, c_in, *hw)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)


def test_report_lists_converted_dense_and_unsupported_layers():
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.Conv2d(32, 64, 1),
        nn.Conv2d(64, 64, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 64).half(),
        nn.Linear(64, 10),
    )
    for i in (0, 1, 6):
        _sparsify(model[i], 0.99, i)
    model.add_module("emb", nn.Embedding(10, 4))
    fast = to_sparse_inference(model, min_sparsity=0.9)
    report = {r["name"]: r for r in fast.sparse_inference_report}
    assert fast.sparse_inference_report.converted == ["1", "6"]
    assert "only 1x1" in report["0"]["reason"]
    assert "< 0.900 (min_sparsity): kept dense" in report["2"]["reason"]
    assert "float16" in report["5"]["reason"]
    assert "not supported" in report["emb"]["reason"]
    assert "1 " in str(fast.sparse_inference_report)
    assert isinstance(model[1], nn.Conv2d), "the original model was changed"


def test_the_rule_needs_more_sparsity_at_batch_1_and_for_small_layers():
    assert ex.min_sparsity_rule(512 * 2048, 1) > ex.min_sparsity_rule(512 * 2048, 64)
    assert ex.min_sparsity_rule(512 * 512, 1) > ex.min_sparsity_rule(512 * 2048, 1)
    assert ex.min_sparsity_rule(128 * 128, 64) == 1.0


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize(("zeros", "converted"), [(0.948, ["0"]), (0.94, [])])
def test_the_default_rule_allows_half_a_percent_of_slack(zeros, converted):
    layer = nn.Sequential(nn.Linear(512, 1024))
    with torch.no_grad():
        flat = layer[0].weight.view(-1)
        flat[: round(zeros * flat.numel())] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fast = to_sparse_inference(layer, batch_size=1)  # the rule says 0.95 at this size
    assert fast.sparse_inference_report.converted == converted


def test_converted_model_copies_saves_and_scripts(tmp_path):
    torch.manual_seed(0)
    model = mlp(32, 64, 8).eval()
    for layer in (model[0], model[2]):
        _sparsify(layer, 0.95, 0)
    fast = to_sparse_inference(model, min_sparsity=0.5)
    x = torch.randn(5, 32)
    expected = model(x)
    torch.testing.assert_close(copy.deepcopy(fast)(x), expected)
    torch.save(fast.state_dict(), tmp_path / "fast.pt")
    again = to_sparse_inference(model, min_sparsity=0.5)
    again.load_state_dict(torch.load(tmp_path / "fast.pt", weights_only=True))
    torch.testing.assert_close(again(x), expected)
    torch.testing.assert_close(torch.jit.script(fast)(x), expected)
    # torch.export.export(fast, ...) fails on torch 2.13: its fake tensors cannot build the CSR
    # tensor from the buffers (docs/deploying.md)


def test_without_safetensors_the_torch_fallback_is_used(tmp_path, monkeypatch):
    _without_safetensors(monkeypatch)
    model, opt = _trained("mlp", "set")
    info = save_sparse(model, tmp_path / "m", masks=opt.masks)
    assert info["format"] == "torch"
    assert (tmp_path / "m").read_bytes()[:2] == b"PK"


# --- structured inference: constant fan-in (condensed) and 2:4 ----------------------------------
def _fan_in_linear(out_f, in_f, k, bias=True, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mask = random_structured((out_f, in_f), "fan_in", g, k)
    layer = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_f, in_f, generator=g).to(dtype) * mask)
        if bias:
            layer.bias.copy_(torch.randn(out_f, generator=g).to(dtype))
    return layer, mask


@settings(max_examples=30, deadline=None)
@given(
    out_f=st.integers(1, 40),
    in_f=st.integers(1, 40),
    frac=st.floats(0.0, 1.0),
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    bias=st.booleans(),
    double=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_condensed_linear_equals_the_masked_dense_layer(
    out_f, in_f, frac, lead, bias, double, seed
):
    dtype = torch.float64 if double else torch.float32
    k = round(frac * in_f)
    dense, mask = _fan_in_linear(out_f, in_f, k, bias, seed, dtype)
    layer = ex.CondensedLinear(dense, mask)
    assert layer.values.shape == (out_f, k)
    assert layer.indices.shape == (out_f, k)
    assert layer.indices.dtype == torch.int32
    assert torch.equal(layer.dense_weight(), dense.weight.detach())
    x = torch.randn(*lead, in_f, dtype=dtype)  # no lead dims: one row, the matrix-vector path
    tol = 1e-12 if double else 1e-5
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense(x), rtol=tol, atol=tol)


def test_condensed_rows_are_ascending_and_active_zeros_need_the_mask():
    dense, mask = _fan_in_linear(6, 10, 3)
    layer = ex.CondensedLinear(dense, mask)
    assert bool((layer.indices[:, 1:] > layer.indices[:, :-1]).all())
    assert torch.equal(ex.CondensedLinear(dense).indices, layer.indices)  # nonzeros == mask
    with torch.no_grad():
        dense.weight[0, int(layer.indices[0, 0])] = 0.0  # an active weight that is exactly 0
    with pytest.raises(ValueError, match="rows hold 2 to 3 nonzeros"):
        ex.CondensedLinear(dense)
    kept = ex.CondensedLinear(dense, mask)
    x = torch.randn(4, 10)
    with torch.no_grad():
        torch.testing.assert_close(kept(x), dense(x))
    with pytest.raises(ValueError, match="outside the mask"):
        ex.CondensedLinear(dense, torch.zeros_like(mask))
    with pytest.raises(TypeError, match=r"mask to be a bool tensor or None, but got torch\.float"):
        ex.CondensedLinear(dense, mask.float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_condensed_half_precision(dtype):
    dense, mask = _fan_in_linear(16, 32, 4, dtype=dtype)
    layer = ex.CondensedLinear(dense, mask)
    for rows in (1, 5):
        x = torch.randn(rows, 32).to(dtype)
        with torch.no_grad():
            ref = (x.double() @ dense.weight.double().T + dense.bias.double()).to(dtype)
            torch.testing.assert_close(layer(x), ref, rtol=2e-2, atol=2e-2)


def test_condensed_all_zero_layer():
    dense = nn.Linear(8, 3)
    with torch.no_grad():
        dense.weight.zero_()
    layer = ex.CondensedLinear(dense)
    assert layer.k == 0
    for shape in ((8,), (5, 8)):
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), dense(x))


_DYNAMO = (
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"  # torch's, in inductor
)


@pytest.mark.filterwarnings(_DYNAMO)
def test_condensed_compiled_equals_eager():
    dense, mask = _fan_in_linear(24, 40, 6)
    layer = ex.CondensedLinear(dense, mask, compile=True)
    assert "compile=True" in repr(layer)
    x = torch.randn(2, 3, 40)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings(_DYNAMO)
def test_condensed_copies_saves_scripts_and_exports(tmp_path):
    dense, mask = _fan_in_linear(12, 20, 5)
    layer = ex.CondensedLinear(dense, mask)
    assert sorted(layer.state_dict()) == ["bias", "indices", "values"]
    torch.save(layer.state_dict(), tmp_path / "c.pt")
    fresh = nn.Linear(20, 12)  # same mask, other values
    with torch.no_grad():
        fresh.weight.mul_(mask)
    again = ex.CondensedLinear(fresh, mask)
    again.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True))
    for rows in (1, 4):
        x = torch.randn(rows, 20)
        with torch.no_grad():
            expected = dense(x)
        torch.testing.assert_close(copy.deepcopy(layer)(x), expected)
        torch.testing.assert_close(again(x), expected)
        torch.testing.assert_close(torch.jit.script(layer)(x), expected)
        exported = torch.export.export(layer, (x,)).module()
        torch.testing.assert_close(exported(x), expected)


@pytest.mark.filterwarnings(_DYNAMO)
@pytest.mark.parametrize("bias", [True, False])
def test_condensed_conv1x1_equals_dense(bias):
    conv = nn.Conv2d(12, 8, 1, bias=bias)
    mask = random_structured(conv.weight.shape, "fan_in", torch.Generator().manual_seed(0), 3)
    with torch.no_grad():
        conv.weight.mul_(mask)
    x = torch.randn(2, 12, 5, 4)
    for compile_ in (False, True):
        layer = ex.CondensedConv1x1(conv, mask, compile=compile_)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="1x1"):
        ex.CondensedConv1x1(nn.Conv2d(12, 8, 3))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings(_DYNAMO)
def test_both_1x1_layers_share_one_adapter_that_scripts():
    """SparseConv1x1 and CondensedConv1x1 are their GEMM layer run over the pixels by one
    adapter; both script (CondensedConv1x1 did not before the adapter), and the condensed one
    exports."""
    conv = nn.Conv2d(12, 8, 1)
    mask = random_structured(conv.weight.shape, "fan_in", torch.Generator().manual_seed(0), 3)
    with torch.no_grad():
        conv.weight.mul_(mask)
    x = torch.randn(2, 12, 5, 4)
    with torch.no_grad():
        expected = conv(x)
    for layer in (ex.SparseConv1x1(conv), ex.CondensedConv1x1(conv, mask)):
        assert repr(layer).startswith(f"{type(layer).__name__}(kernel_size=(1, 1), in_features=12")
        with torch.no_grad():
            torch.testing.assert_close(torch.jit.script(layer)(x), expected)
    exported = torch.export.export(ex.CondensedConv1x1(conv, mask), (x,)).module()
    torch.testing.assert_close(exported(x), expected)


class _Lin2Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 48)
        self.conv = nn.Conv2d(48, 48, 1)

    def forward(self, x):
        return self.conv(torch.relu(self.fc(x)).unsqueeze(-1).unsqueeze(-1)).flatten(1)


def test_structure_auto_condenses_fan_in_layers_and_reports_them():
    model = _Lin2Conv()
    g = torch.Generator().manual_seed(0)
    for layer in (model.fc, model.conv):
        with torch.no_grad():
            layer.weight.mul_(random_structured(layer.weight.shape, "fan_in", g, 4))
    fast = to_sparse_inference(model, structure="auto", min_sparsity=0.9)
    report = {r["name"]: r for r in fast.sparse_inference_report}
    assert isinstance(fast.fc, ex.CondensedLinear)
    assert isinstance(fast.conv, ex.CondensedConv1x1)
    assert report["fc"]["converted"] == "condensed"
    assert report["fc"]["structure"] == "fan_in"
    assert "constant fan-in 4" in report["fc"]["reason"]
    assert "condensed" in str(fast.sparse_inference_report)
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    # the default structure=None keeps the unstructured behaviour: CSR
    plain = to_sparse_inference(model, min_sparsity=0.9)
    assert isinstance(plain.fc, ex.SparseLinear)
    assert all(r["structure"] is None for r in plain.sparse_inference_report)


def test_masks_make_the_structure_exact_when_an_active_weight_is_zero():
    model = nn.Sequential(nn.Linear(32, 16))
    mask = random_structured((16, 32), "fan_in", torch.Generator().manual_seed(0), 3)
    with torch.no_grad():
        model[0].weight.mul_(mask)
        model[0].weight[2, int(mask[2].nonzero()[0])] = 0.0
    with pytest.warns(UserWarning, match="converted no layer"):
        guessed = to_sparse_inference(model, structure="fan_in", min_sparsity=0.99)
    row = guessed.sparse_inference_report[0]
    assert row["structure"] is None
    assert "not fan_in: " in row["reason"]
    assert "rows hold another count (rows hold 2 to 3 active)" in row["reason"]
    exact = to_sparse_inference(
        model, structure="fan_in", min_sparsity=0.9, masks={model[0].weight: mask}
    )
    assert isinstance(exact[0], ex.CondensedLinear)
    assert exact[0].k == 3
    assert exact.sparse_inference_report[0]["sparsity"] == pytest.approx(1 - 3 / 32)
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(exact(x), model(x))
    by_name = to_sparse_inference(
        model, structure="auto", min_sparsity=0.9, masks={"0.weight": mask}
    )
    assert isinstance(by_name[0], ex.CondensedLinear)


def test_a_size_that_never_pays_says_never():
    """The rule's 1.0 means "never at this size": the report says that, not "< 1.000"."""
    model = nn.Sequential(nn.Linear(256, 256))  # 2**16 weights: CSR never won at any batch
    _sparsify(model[0], 0.9, 0)
    with pytest.warns(UserWarning, match="converted no layer"):
        fast = to_sparse_inference(model, batch_size=64)
    row = fast.sparse_inference_report[0]
    assert row["reason"] == (
        f"sparsity {row['sparsity']:.3f}: never at this size (65536 weights), dense is faster at "
        "any sparsity"
    )
    # 512x512 condensed pays from batch 64 only: at batch 1 the report says from where
    layer = nn.Linear(512, 512)
    mask = random_structured(layer.weight.shape, "fan_in", torch.Generator().manual_seed(0), 48)
    with torch.no_grad():
        layer.weight.mul_(mask)
    model = nn.Sequential(layer)
    with pytest.warns(UserWarning, match="converted no layer"):
        fast = to_sparse_inference(model, structure="fan_in", masks={"0.weight": mask})
    assert fast.sparse_inference_report[0]["reason"] == (
        "constant fan-in 48: sparsity 0.906: never at batch size 1 for this size (262144 "
        "weights), dense is faster at any sparsity (from batch size 64: 0.900)"
    )
    fast = to_sparse_inference(model, structure="fan_in", masks={"0.weight": mask}, batch_size=64)
    assert fast.sparse_inference_report.converted == ["0"]


def test_the_fan_in_rule_keeps_dense_what_condensed_would_slow_down():
    model = _Lin2Conv()
    g = torch.Generator().manual_seed(0)
    for layer in (model.fc, model.conv):  # 40 of 64 and 40 of 48: barely sparse
        with torch.no_grad():
            layer.weight.mul_(random_structured(layer.weight.shape, "fan_in", g, 40))
    with pytest.warns(UserWarning, match="converted no layer"):
        fast = to_sparse_inference(model, structure="auto")
    assert all("dense is faster" in r["reason"] for r in fast.sparse_inference_report)
    assert ex.fan_in_min_sparsity_rule(64 * 48, 1) == 1.0  # tiny layers never pay


def _two_four_linear(out_f=64, in_f=128, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g)
    mask = select_structured(w.abs(), "2:4")
    layer = nn.Linear(in_f, out_f).to(dtype)
    with torch.no_grad():
        layer.weight.copy_((w * mask).to(dtype))
    return layer, mask


@pytest.mark.parametrize("structure", ["auto", "2:4"])
def test_two_four_on_cpu_falls_back_and_says_why(structure):
    layer, _ = _two_four_linear()
    model = nn.Sequential(layer)
    with pytest.warns(UserWarning, match="converted no layer"):
        fast = to_sparse_inference(model, structure=structure)
    row = fast.sparse_inference_report[0]
    assert row["structure"] == "2:4"
    assert row["converted"] is None
    assert row["reason"].startswith(
        "2:4 mask (the semi-structured 2:4 kernels run on CUDA devices of compute capability "
        ">= 8.0, and this weight is on cpu); constant fan-in 64: "
    )
    assert row["reason"].endswith(
        "constant fan-in 64: sparsity 0.500: never at this size (8192 weights), dense is faster "
        "at any sparsity"
    )
    assert "but" not in row["reason"]  # it read "... but ... need a CUDA device, but the weight"
    # with min_sparsity the fallback is the condensed layer (k = in / 2)
    forced = to_sparse_inference(model, structure=structure, min_sparsity=0.5)
    assert isinstance(forced[0], ex.CondensedLinear)
    x = torch.randn(3, 128)
    with torch.no_grad():
        torch.testing.assert_close(forced(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="CUDA device"):
        ex.SemiStructuredLinear(layer)


def test_other_n_m_structures_are_condensed_and_wrong_ones_reported():
    layer = nn.Linear(64, 32)
    with torch.no_grad():
        layer.weight.mul_(select_structured(layer.weight.abs(), "1:8"))
    model = nn.Sequential(layer)
    fast = to_sparse_inference(model, structure="1:8", min_sparsity=0.8)
    assert fast.sparse_inference_report[0]["structure"] == "1:8"
    assert isinstance(fast[0], ex.CondensedLinear)
    assert fast[0].k == 8
    with pytest.warns(UserWarning, match="converted no layer"):
        wrong = to_sparse_inference(model, structure="2:4")
    assert (
        "not 2:4: 512 of 512 groups hold another count"
        in (wrong.sparse_inference_report[0]["reason"])
    )
    with pytest.warns(UserWarning, match="converted no layer"):
        odd = to_sparse_inference(nn.Sequential(nn.Linear(6, 4)), structure="2:4")
    assert odd.sparse_inference_report[0]["reason"].startswith(
        "input dimension 6 is not a multiple of 4: not 2:4; "
    )


def test_structure_argument_errors():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"to be None, 'auto', 'fan_in' or 'N:M'.*'3:2'"):
        to_sparse_inference(model, structure="3:2")
    with pytest.raises(TypeError, match="Expected structure"):
        to_sparse_inference(model, structure=4)
    with pytest.raises(ValueError, match="masks to hold tensors of the model"):
        to_sparse_inference(model, structure="auto", masks={"nope": torch.ones(8, 8).bool()})


def test_the_cpu_reference_packs_an_exported_two_four_weight():
    """torch's CPU reference of the CUTLASS compression keeps exactly the 2:4 weights."""
    conversions = pytest.importorskip("torch.sparse._semi_structured_conversions")
    layer, mask = _two_four_linear(64, 128, torch.float16)
    check_structured(layer.weight != 0, "2:4")
    w = layer.weight.detach()
    packed, meta = conversions.sparse_semi_structured_from_dense_cutlass(w)
    assert packed.shape == (64, 64)  # half the columns: two values per group of four
    back = conversions.sparse_semi_structured_to_dense_cutlass(packed, meta)
    assert torch.equal(back, w)
    assert torch.equal(packed.reshape(-1), w[mask].reshape(-1))


@pytest.mark.cuda
def test_semi_structured_linear_on_cuda(device):
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        pytest.skip("semi-structured 2:4 needs compute capability >= 8.0")
    layer, _ = _two_four_linear(256, 512, torch.float16)
    layer = layer.to(device)
    fast = to_sparse_inference(nn.Sequential(layer), structure="2:4")
    row = fast.sparse_inference_report[0]
    assert row["converted"] == "2:4", row["reason"]
    assert isinstance(fast[0], ex.SemiStructuredLinear)
    for shape in ((1, 512), (3, 7, 512), (256, 512)):
        x = torch.randn(shape, device=device, dtype=torch.float16)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), layer(x), rtol=1e-2, atol=1e-2)
    with pytest.warns(UserWarning, match="converted no layer"):
        fp32 = to_sparse_inference(nn.Sequential(layer.float()), structure="2:4")
    assert "float16/bfloat16" in fp32.sparse_inference_report[0]["reason"]


@pytest.mark.cuda
def test_condensed_on_cuda(device):
    dense, mask = _fan_in_linear(32, 64, 7)
    dense = dense.to(device)
    layer = ex.CondensedLinear(dense, mask.to(device))
    for rows in (1, 9):
        x = torch.randn(rows, 64, device=device)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)
