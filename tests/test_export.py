"""Export: the compact sparse checkpoint (save_sparse/load_sparse) and sparse inference modules."""

from __future__ import annotations

import copy
import os
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


@pytest.fixture(params=[True, False], ids=["safetensors", "torch-fallback"])
def backend(request, monkeypatch):
    if request.param:
        pytest.importorskip("safetensors")
    else:
        monkeypatch.setattr(ex, "_have_safetensors", lambda: False)
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
def test_position_encodings_round_trip_and_the_smaller_is_chosen(density):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(3001, generator=g) < density
    mask[-1] = True
    kind, code = ex._encode_positions(mask)
    assert torch.equal(ex._decode_positions(kind, code, mask.numel()), mask)
    other = "bitmask" if kind == "gaps" else "gaps"
    other_code = (
        ex._pack_bits(mask) if other == "bitmask" else ex._gap_bytes(torch.nonzero(mask)[:, 0])
    )
    assert torch.equal(ex._decode_positions(other, other_code, mask.numel()), mask)
    assert code.numel() <= other_code.numel()


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
    with pytest.raises(ValueError, match=r"Expected min_sparsity to be in \[0, 1\], but got 2"):
        to_sparse_inference(model, min_sparsity=2)
    with pytest.raises(TypeError, match="Expected min_sparsity to be a float or None"):
        to_sparse_inference(model, min_sparsity="0.9")
    with pytest.raises(ValueError, match="Expected layout to be one of"):
        to_sparse_inference(model, layout="coo")
    with pytest.raises(ValueError, match="Expected batch_size to be positive, but got 0"):
        to_sparse_inference(model, batch_size=0)
    with pytest.raises(TypeError, match="Expected batch_size to be an int, but got float"):
        to_sparse_inference(model, batch_size=1.0)


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
    assert "dense is faster" in report["2"]["reason"]
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
    monkeypatch.setattr(ex, "_have_safetensors", lambda: False)
    model, opt = _trained("mlp", "set")
    info = save_sparse(model, tmp_path / "m", masks=opt.masks)
    assert info["format"] == "torch"
    assert (tmp_path / "m").read_bytes()[:2] == b"PK"
