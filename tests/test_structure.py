"""Structured-mask kernels (sparseopt.structure): exact counts, ties, and a slow reference.

Every fast function is compared, bit for bit, with a Python-loop reference over the groups or
rows, on scores drawn from a few values (so that ties are the rule, not the exception) with
``-inf`` and NaN mixed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseopt.structure import (
    NM,
    FanIn,
    Structure,
    check_structured,
    density,
    fits,
    gemm_shape,
    parse_structure,
    random_structured,
    row_count,
    select_structured,
    structure_violations,
    structured_drop_and_grow,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
FAST = settings(max_examples=40, deadline=None)


# --- the reference -------------------------------------------------------------------------------
def _units(shape, s):
    """Flat index lists, one per group (N:M) or row (fan_in)."""
    rows, fan_in = shape[0], math.prod(shape[1:])
    length = s.m if s.kind == "nm" else fan_in
    out = []
    for r in range(rows):
        for start in range(0, fan_in, length):
            out.append([r * fan_in + start + j for j in range(length)])
    return out


def _key_largest(v):
    return -math.inf if math.isnan(v) else v


def ref_select(scores, s, k):
    flat = scores.double().reshape(-1).tolist()
    count = s.n if s.kind == "nm" else k
    out = [False] * len(flat)
    for unit in _units(scores.shape, s):
        ranked = sorted(unit, key=lambda i: (-_key_largest(flat[i]), i))
        for i in ranked[:count]:
            out[i] = True
    return torch.tensor(out).view(scores.shape)


def ref_drop_and_grow(mask, drop_scores, grow_scores, s, k_drop):
    m = mask.reshape(-1).tolist()
    d = drop_scores.double().reshape(-1).tolist()
    g = grow_scores.double().reshape(-1).tolist()
    active = [i for i in range(len(m)) if m[i]]
    active.sort(key=lambda i: (math.inf if math.isnan(d[i]) else d[i], i))  # NaN as +inf
    dropped = set(active[:k_drop])
    new = [m[i] and i not in dropped for i in range(len(m))]
    for unit in _units(mask.shape, s):
        need = sum(1 for i in unit if i in dropped)
        candidates = sorted((i for i in unit if not new[i]), key=lambda i: (-_key_largest(g[i]), i))
        for i in candidates[:need]:
            new[i] = True
    new_t = torch.tensor(new).view(mask.shape)
    return new_t, mask & ~new_t, new_t & ~mask


# --- strategies ----------------------------------------------------------------------------------
@st.composite
def nm_case(draw):
    """An N:M structure and a 2-D or 4-D shape whose fan-in is a multiple of M."""
    m = draw(st.integers(2, 8))
    n = draw(st.integers(1, m - 1))
    out = draw(st.integers(1, 5))
    groups = draw(st.integers(1, 4))
    if draw(st.booleans()):
        shape = (out, m * groups)
    else:
        shape = (out, m * groups, draw(st.integers(1, 3)), draw(st.integers(1, 2)))
    return Structure("nm", n, m), shape, None


@st.composite
def fan_in_case(draw):
    out = draw(st.integers(1, 6))
    if draw(st.booleans()):
        shape = (out, draw(st.integers(1, 24)))
    else:
        shape = (out, draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    k = draw(st.integers(0, math.prod(shape[1:])))
    return Structure("fan_in"), shape, k


cases = st.one_of(nm_case(), fan_in_case())


def tied_scores(shape, seed, dtype=torch.float32, specials=True):
    """Scores in {-2, ..., 2} (ties everywhere); with ``specials`` also inf, -inf, NaN, -0.0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, shape, generator=g).to(torch.float64)
    if specials:
        pick = torch.rand(shape, generator=g)
        x[pick < 0.08] = -math.inf
        x[(pick >= 0.08) & (pick < 0.12)] = math.nan
        x[(pick >= 0.12) & (pick < 0.15)] = math.inf
        x[(pick >= 0.15) & (pick < 0.3) & (x == 0)] = -0.0  # ties with 0.0
    return x.to(dtype)


def _unit_counts(mask, s):
    _rows, fan_in = gemm_shape(mask.shape)
    length = s.m if s.kind == "nm" else fan_in
    return mask.reshape(-1, length).sum(1)


# --- parsing -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2:4", Structure("nm", 2, 4)),
        ("1:4", Structure("nm", 1, 4)),
        ("4:8", Structure("nm", 4, 8)),
        ("1:2", Structure("nm", 1, 2)),
        ("fan_in", Structure("fan_in")),
    ],
)
def test_parse_and_str_round_trip(text, expected):
    s = parse_structure(text)
    assert s == expected
    assert str(s) == text
    assert parse_structure(s) is s
    assert parse_structure(str(s)) == s


@pytest.mark.parametrize(
    "text",
    ["3:2", "2:0", "0:4", "4:4", "abc", "2:4:8", "", " 2:4", "2 :4", "-1:4", "2:4 ", "FAN_IN"],
)
def test_parse_errors(text):
    with pytest.raises(ValueError, match="Expected structure to be None, 'fan_in' or 'N:M'") as e:
        parse_structure(text)
    assert repr(text) in str(e.value)


def test_parse_error_message_is_exact():
    with pytest.raises(ValueError, match="3:2") as e:
        parse_structure("3:2")
    assert str(e.value) == (
        "Expected structure to be None, 'fan_in' or 'N:M' with 0 < N < M, but got '3:2'"
    )


@pytest.mark.parametrize("value", [2, 2.5, b"2:4", (2, 4), ["fan_in"]])
def test_parse_refuses_non_strings(value):
    with pytest.raises(TypeError, match="Expected structure to be None"):
        parse_structure(value)


def test_parse_none_and_bad_dataclass():
    assert parse_structure(None) is None
    with pytest.raises(ValueError, match="0 < N < M"):
        Structure("nm", 4, 4)
    with pytest.raises(ValueError, match="kind"):
        Structure("block", 2, 4)
    with pytest.raises(ValueError, match="None for 'fan_in'"):
        Structure("fan_in", 2, 4)


def test_shapes_density_and_row_count():
    assert gemm_shape((8, 3, 3, 3)) == (8, 27)
    assert gemm_shape(torch.Size([5, 7])) == (5, 7)
    with pytest.raises(ValueError, match="ndim >= 2"):
        gemm_shape((5,))
    assert fits((8, 16), "2:4")
    assert fits((8, 4, 2, 2), "2:4")
    assert not fits((8, 6), "2:4")
    assert fits((8, 3, 3, 3), "fan_in")
    assert not fits((8,), "fan_in")
    assert not fits((0, 4), "2:4")
    assert fits((5,), None)
    assert density("2:4") == 0.5
    assert density("1:3") == 1 / 3
    with pytest.raises(ValueError, match="per layer"):
        density("fan_in")
    assert row_count((10, 100), 0.1) == 10
    assert row_count((10, 100), 0.0) == 1  # at least one
    assert row_count((10, 100), 1.0) == 100
    assert row_count((10, 4), 0.625) == 2  # round(2.5) == 2, half to even
    assert row_count((10, 4, 3, 3), 0.05) == 2  # round(1.8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        row_count((10, 4), 1.5)
    with pytest.raises(TypeError, match="density"):
        row_count((10, 4), "0.5")


# --- selection -----------------------------------------------------------------------------------
@FAST
@given(case=cases, seed=st.integers(0, 2**31), dtype=st.sampled_from(DTYPES))
def test_select_equals_reference_and_counts_are_exact(case, seed, dtype):
    s, shape, k = case
    scores = tied_scores(shape, seed, dtype)
    mask = select_structured(scores, s, k)
    assert mask.dtype == torch.bool
    assert mask.shape == scores.shape
    assert torch.equal(mask, ref_select(scores, s, k))
    want = s.n if s.kind == "nm" else k
    assert bool((_unit_counts(mask, s) == want).all())
    check_structured(mask, s, k)


def test_select_ties_go_to_the_lowest_index_and_minus_inf_last():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, -math.inf, 0.0, -math.inf, math.nan]])
    assert select_structured(scores, "2:4").int().tolist() == [[1, 1, 0, 0, 1, 1, 0, 0]]
    assert select_structured(scores, "fan_in", k=6).int().tolist() == [[1, 1, 1, 1, 1, 1, 0, 0]]


def test_select_nm_accepts_the_matching_k_only():
    scores = torch.randn(3, 8)
    assert torch.equal(select_structured(scores, "2:4", k=4), select_structured(scores, "2:4"))
    with pytest.raises(ValueError, match="Expected k to be None or 4"):
        select_structured(scores, "2:4", k=3)


@pytest.mark.parametrize(
    ("shape", "structure", "k", "error", "match"),
    [
        ((3, 6), "2:4", None, ValueError, "multiple of 4"),
        ((3,), "fan_in", 1, ValueError, "ndim >= 2"),
        ((3, 6), "fan_in", None, ValueError, "Expected k"),
        ((3, 6), "fan_in", 7, ValueError, r"0 <= k <= 6"),
        ((3, 6), "fan_in", -1, ValueError, r"0 <= k <= 6"),
        ((3, 6), "fan_in", 2.0, TypeError, "Expected k to be an int"),
        ((3, 6), None, None, ValueError, "got None"),
        ((3, 6), "2:3:4", None, ValueError, "Expected structure"),
    ],
)
def test_select_errors(shape, structure, k, error, match):
    with pytest.raises(error, match=match):
        select_structured(torch.randn(shape), structure, k)


# --- random --------------------------------------------------------------------------------------
@FAST
@given(case=cases, seed=st.integers(0, 2**31))
def test_random_counts_are_exact_and_the_seed_fixes_the_mask(case, seed):
    s, shape, k = case
    mask = random_structured(shape, s, torch.Generator().manual_seed(seed), k)
    assert mask.device.type == "cpu"
    assert mask.dtype == torch.bool
    assert mask.shape == shape
    check_structured(mask, s, k)
    again = random_structured(shape, s, torch.Generator().manual_seed(seed), k)
    assert torch.equal(mask, again)


def test_random_is_uniform_inside_groups_and_rows():
    g = torch.Generator().manual_seed(0)
    nm = torch.stack([random_structured((1, 4), "1:4", g) for _ in range(4000)]).float()
    freq = nm.mean(0).reshape(-1)
    assert torch.allclose(freq, torch.full_like(freq, 0.25), atol=0.03), freq
    rows = torch.stack([random_structured((2, 5), "fan_in", g, k=2) for _ in range(4000)])
    freq = rows.float().mean(0).reshape(-1)
    assert torch.allclose(freq, torch.full_like(freq, 0.4), atol=0.03), freq
    assert not torch.equal(rows[0], rows[1]) or not torch.equal(rows[1], rows[2])


def test_random_refuses_a_non_cpu_or_missing_generator():
    with pytest.raises(TypeError, match=r"CPU torch\.Generator"):
        random_structured((2, 4), "2:4", 0)
    if torch.cuda.is_available():
        with pytest.raises(TypeError, match=r"CPU torch\.Generator"):
            random_structured((2, 4), "2:4", torch.Generator(device="cuda"))


# --- drop and grow -------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    case=cases,
    seed=st.integers(0, 2**31),
    frac=st.floats(0.0, 1.0),
    dtype=st.sampled_from(DTYPES),
    specials=st.booleans(),
)
def test_drop_and_grow_equals_reference_and_keeps_every_count(case, seed, frac, dtype, specials):
    s, shape, k = case
    g = torch.Generator().manual_seed(seed)
    mask = random_structured(shape, s, g, k)
    drop = tied_scores(shape, seed + 1, dtype, specials)
    grow = tied_scores(shape, seed + 2, dtype, specials)
    k_drop = round(frac * int(mask.sum()))
    new, dropped, grown = structured_drop_and_grow(mask, drop, grow, s, k_drop)
    ref = ref_drop_and_grow(mask, drop, grow, s, k_drop)
    for got, want in zip((new, dropped, grown), ref, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(_unit_counts(new, s), _unit_counts(mask, s))
    check_structured(new, s, k)
    assert torch.equal(dropped, mask & ~new)
    assert torch.equal(grown, new & ~mask)
    assert int(dropped.sum()) == int(grown.sum()) <= k_drop


@settings(max_examples=30, deadline=None)
@given(case=cases, seed=st.integers(0, 2**31))
def test_drop_and_grow_keeps_any_counts_even_unstructured(case, seed):
    """The per-group counts of the input are kept whatever they are (no structure assumed)."""
    s, shape, _ = case
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) < 0.5
    drop, grow = torch.rand(shape, generator=g), torch.rand(shape, generator=g)
    k_drop = int(mask.sum()) // 2
    new, *_ = structured_drop_and_grow(mask, drop, grow, s, k_drop)
    assert torch.equal(_unit_counts(new, s), _unit_counts(mask, s))
    assert torch.equal(new, ref_drop_and_grow(mask, drop, grow, s, k_drop)[0])


def test_drop_and_grow_regrown_weights_are_neither_dropped_nor_grown():
    mask = torch.tensor([[True, True, False, False]])
    drop = torch.tensor([[0.1, 0.9, 0.0, 0.0]])
    grow = torch.tensor([[5.0, 0.0, 1.0, 1.0]])  # the dropped weight has the largest score
    new, dropped, grown = structured_drop_and_grow(mask, drop, grow, "2:4", 1)
    assert torch.equal(new, mask)
    assert not dropped.any()
    assert not grown.any()
    # The drop is layer-wide: both smallest weights are in row 1; row 0 keeps its weights.
    mask = torch.tensor([[True, False, True, False], [True, True, False, False]])
    drop = torch.tensor([[0.5, 0.0, 0.6, 0.0], [0.1, 0.2, 0.0, 0.0]])
    grow = torch.tensor([[0.0, 9.0, 0.0, 9.0], [0.0, 0.0, 3.0, 3.0]])
    new, dropped, grown = structured_drop_and_grow(mask, drop, grow, "fan_in", 2)
    assert new.int().tolist() == [[1, 0, 1, 0], [0, 0, 1, 1]]
    assert dropped.int().tolist() == [[0, 0, 0, 0], [1, 1, 0, 0]]


@pytest.mark.parametrize("structure", ["2:4", "fan_in"])
def test_drop_and_grow_regrows_even_when_every_grow_score_is_minus_inf(structure):
    """A kept weight before the candidates must not use up a regrowth slot."""
    mask = torch.tensor([[True, True, False, False]])
    drop = torch.tensor([[0.9, 0.1, 0.0, 0.0]])  # drops column 1; column 0 stays
    for value in (-math.inf, math.nan):
        grow = torch.full((1, 4), value)
        new, dropped, grown = structured_drop_and_grow(mask, drop, grow, structure, 1)
        assert torch.equal(new, mask)  # column 1, the lowest candidate, comes back
        assert not dropped.any()
        assert not grown.any()


def test_drop_and_grow_zero_and_errors():
    mask = random_structured((4, 8), "2:4", torch.Generator().manual_seed(0))
    scores = torch.rand(4, 8)
    new, dropped, grown = structured_drop_and_grow(mask, scores, scores, "2:4", 0)
    assert torch.equal(new, mask)
    assert new is not mask
    assert not dropped.any()
    assert not grown.any()
    with pytest.raises(ValueError, match=r"0 <= k_drop <= 16"):
        structured_drop_and_grow(mask, scores, scores, "2:4", 17)
    with pytest.raises(TypeError, match="k_drop"):
        structured_drop_and_grow(mask, scores, scores, "2:4", 1.0)
    with pytest.raises(TypeError, match="bool tensor"):
        structured_drop_and_grow(mask.float(), scores, scores, "2:4", 1)
    with pytest.raises(ValueError, match="grow_scores"):
        structured_drop_and_grow(mask, scores, scores.T, "2:4", 1)


# --- checks --------------------------------------------------------------------------------------
@FAST
@given(case=cases, seed=st.integers(0, 2**31), data=st.data())
def test_check_rejects_a_broken_mask(case, seed, data):
    """The negative control: one flipped bit breaks exactly one group or row."""
    s, shape, k = case
    mask = random_structured(shape, s, torch.Generator().manual_seed(seed), k)
    assert structure_violations(mask, s, k) == 0
    check_structured(mask, s, k)
    flip = data.draw(st.integers(0, mask.numel() - 1))
    broken = mask.clone().reshape(-1)
    broken[flip] = ~broken[flip]
    broken = broken.view(shape)
    assert structure_violations(broken, s, k) == 1
    rows, fan_in = gemm_shape(shape)
    row, col = divmod(flip, fan_in)
    if s.kind == "nm":
        start = col // s.m * s.m
        match = f"row {row}, columns {start}..{start + s.m - 1} holds"
    else:
        match = f"row {row} holds"
    if s.kind == "nm" or rows > 2:  # with k=None, fan_in compares rows with the majority
        with pytest.raises(ValueError, match=match):
            check_structured(broken, s, k if s.kind == "fan_in" else None)


def test_check_messages_and_types():
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match=r"row 1, columns 0\.\.3 holds 1 \(2 bad groups of 3\)"):
        check_structured(mask, "2:4")
    with pytest.raises(ValueError, match=r"hold 2 active .* row 1 holds 1 \(2 bad rows of 3\)"):
        check_structured(mask, "fan_in", k=2)
    assert structure_violations(mask, "fan_in") == 2  # the majority count is 1 (tie: smallest)
    with pytest.raises(TypeError, match="bool tensor"):
        check_structured(mask.int(), "2:4")
    conv = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    conv[1, 1, 1, 1] = True  # GEMM view (2, 8): row 1, column 7
    with pytest.raises(ValueError, match=r"row 0, columns 0\.\.3 holds 0"):
        check_structured(conv, "1:4")
    assert structure_violations(conv, "1:4") == 3


# --- devices -------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["2:4", "1:8", "fan_in"])
def test_same_masks_on_the_device(structure, device):
    shape = (16, 8, 3, 3) if structure != "1:8" else (16, 64)
    k = 20 if structure == "fan_in" else None
    mask = random_structured(shape, structure, torch.Generator().manual_seed(0), k)
    drop = tied_scores(shape, 1, specials=False)
    grow = tied_scores(shape, 2)
    sel = select_structured(grow.to(device), structure, k)
    assert sel.device == device if device.index is not None else sel.device.type == device.type
    assert torch.equal(sel.cpu(), select_structured(grow, structure, k))
    out = structured_drop_and_grow(mask.to(device), drop.to(device), grow.to(device), structure, 50)
    ref = structured_drop_and_grow(mask, drop, grow, structure, 50)
    for a, b in zip(out, ref, strict=True):
        assert torch.equal(a.cpu(), b)
    check_structured(out[0], structure, k)


# --- the protocol ------------------------------------------------------------------------------
def test_the_built_in_structures_are_values():
    """``NM`` and ``FanIn`` compare, hash, print and pickle as values; ``Structure(kind, ...)``,
    ``parse_structure`` and the classes build the same objects."""
    import copy
    import pickle

    assert Structure("nm", 2, 4) == NM(2, 4) == parse_structure("2:4")
    assert Structure("fan_in") == FanIn() == parse_structure("fan_in")
    assert NM(2, 4) != NM(1, 4) and NM(2, 4) != FanIn()  # noqa: PT018
    assert len({NM(2, 4), Structure("nm", 2, 4), FanIn(), Structure("fan_in")}) == 2
    assert repr(NM(1, 8)) == "NM(n=1, m=8)" and repr(FanIn()) == "FanIn()"  # noqa: PT018
    for s in (NM(2, 4), FanIn()):
        assert isinstance(s, Structure)
        assert pickle.loads(pickle.dumps(s)) == s
        assert copy.deepcopy(s) == s
    assert (NM(2, 4).n, NM(2, 4).m, FanIn().n, FanIn().m) == (2, 4, None, None)
    with pytest.raises(AttributeError, match="immutable"):
        NM(2, 4).n = 3


@pytest.mark.parametrize(
    ("s", "shape", "units", "per", "count", "why"),
    [
        (NM(2, 4), (3, 8), (6, 4), 2, 12, None),
        (NM(1, 4), (2, 2, 2, 2), (4, 4), 1, 4, None),
        (NM(2, 4), (3, 6), None, None, None, "input dimension 6 is not a multiple of 4"),
        (FanIn(), (3, 5), (3, 5), 2, 6, None),
        (FanIn(), (4,), None, None, None, "ndim >= 2"),
        (FanIn(), (0, 4), None, None, None, "no empty dimension"),
    ],
)
def test_units_counts_and_reasons(s, shape, units, per, count, why):
    if why is not None:
        assert why in s.why_not(shape)
        assert not s.fits(shape)
        return
    assert s.why_not(shape) is None and s.fits(shape)  # noqa: PT018
    assert s.units(shape) == units
    assert s.per_unit(shape, count) == per
    assert s.layer_count(shape, 0.4) == count  # FanIn: round(0.4 * 5) = 2 per row


def test_the_fan_in_per_row_rule_and_counts_it_refuses():
    assert FanIn().layer_count((10, 4, 3, 3), 0.05) == 10 * row_count((10, 4, 3, 3), 0.05) == 20
    assert FanIn().per_unit((3, 5)) is None  # no fixed count: checks compare with the majority
    assert NM(2, 4).per_unit((3, 8)) == 2
    with pytest.raises(ValueError, match="multiple of the 3 rows"):
        FanIn().per_unit((3, 5), 7)
    with pytest.raises(ValueError, match=r"count to be 12 \(2 in each of 6 groups of 4\)"):
        NM(2, 4).select(torch.rand(3, 8), 10)
    with pytest.raises(TypeError, match="count to be an int"):
        FanIn().select(torch.rand(3, 8), 6.0)


@dataclass(frozen=True)
class ColumnGroups(Structure):
    """``n`` active in every group of ``rows`` consecutive rows of one input column: N:M along
    the output dimension. sparseopt does not ship it; this class is all it takes."""

    n: int = 1
    rows: int = 8
    kind = "column_groups"
    unit_noun = "column group"

    def __str__(self):
        return f"{self.n} in {self.rows} rows"

    @property
    def fixed_density(self):
        return self.n / self.rows

    def why_not(self, shape):
        why = super().why_not(shape)
        if why is None and shape[0] % self.rows:
            why = f"{shape[0]} rows are not a multiple of {self.rows}"
        return why

    def units(self, shape):
        out, fan_in = gemm_shape(shape)
        return out // self.rows * fan_in, self.rows

    def per_unit(self, shape, count=None):
        if count is not None and count != self.units(shape)[0] * self.n:
            raise ValueError(f"Expected {self.units(shape)[0] * self.n}, but got {count}")
        return self.n

    def layer_count(self, shape, density):
        return self.units(shape)[0] * self.n

    def to_units(self, t):
        out, fan_in = gemm_shape(t.shape)
        return t.reshape(out // self.rows, self.rows, fan_in).transpose(1, 2).reshape(-1, self.rows)

    def from_units(self, u, shape):
        out, fan_in = gemm_shape(shape)
        blocks = u.reshape(out // self.rows, fan_in, self.rows).transpose(1, 2)
        return blocks.reshape(tuple(shape))


def column_group_counts(mask, rows=8):
    """Active weights per (row block, column), by a Python loop over the GEMM view."""
    flat = mask.reshape(mask.shape[0], -1).tolist()
    return [
        sum(flat[r][c] for r in range(start, start + rows))
        for start in range(0, len(flat), rows)
        for c in range(len(flat[0]))
    ]


def test_a_new_structure_gets_every_kernel_from_the_protocol():
    s = ColumnGroups(2, 4)
    g = torch.Generator().manual_seed(0)
    mask = s.random((8, 3, 2), 2 * 6 * 2, g)
    assert column_group_counts(mask, 4) == [2] * 12
    s.check(mask)
    scores = tied_scores((8, 6), 1)
    sel = s.select(scores, 24)
    # reference: per column block, the 2 best (NaN as -inf), ties to the lower row
    flat = scores.double().tolist()
    for start in (0, 4):
        for c in range(6):
            ranked = sorted(range(start, start + 4), key=lambda r: (-_key_largest(flat[r][c]), r))
            assert [bool(sel[r, c]) for r in range(start, start + 4)] == [
                r in ranked[:2] for r in range(start, start + 4)
            ]
    new, dropped, grown = s.exchange(sel, scores.abs(), tied_scores((8, 6), 2), 7)
    assert column_group_counts(new, 4) == [2] * 12
    assert int(dropped.sum()) == int(grown.sum()) <= 7
    broken = new.clone()
    broken[0, 0] = ~broken[0, 0]
    assert s.violations(broken) == 1
    with pytest.raises(ValueError, match=r"every column group to hold 2 active under 2 in 4 rows"):
        s.check(broken)


@pytest.mark.filterwarnings("ignore:the learning rate at the end of phase 1")
def test_a_new_structure_trains_end_to_end_without_touching_the_library():
    """RigL + Sup-tickets under a structure defined in this file: every step, the re-prune of
    each consolidate and the ultimate ticket hold it; methods that move the density refuse it."""
    from sparseopt import SparseOptimizer, SupTicketsScheduler

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16), torch.nn.ReLU(),
        torch.nn.Linear(16, 4),
    )  # fmt: skip
    s = ColumnGroups(1, 8)
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), "rigl",
                          structure=s, model=model, update_every=2, seed=0)  # fmt: skip
    assert opt.sparsity == 0.875
    assert [layer.name for layer in opt.layers] == ["0.weight", "2.weight"]
    assert opt.report()["dense"] == [
        {"name": "4.weight", "shape": (4, 16), "reason": "4 rows are not a multiple of 8"}
    ]
    sched = SupTicketsScheduler(opt, 32, 4, superpose_fraction=0.4, lr_low=0.01, lr_high=0.02)
    g = torch.Generator().manual_seed(0)
    tickets = [torch.zeros_like(layer.mask) for layer in opt.layers]  # union of the tickets
    checked = False
    for _ in range(32):
        x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        for layer, union in zip(opt.layers, tickets, strict=True):
            assert column_group_counts(layer.mask) == [1] * (layer.mask.numel() // 8)
            assert (layer.param.detach()[~layer.mask] == 0).all()
            if opt.tickets:
                union |= layer.mask
        if opt.tickets == 2 and not checked:  # two tickets averaged, then re-pruned
            checked = True
            # the tickets' supports differ, so their average breaks the structure ...
            assert any(max(column_group_counts(union)) > 1 for union in tickets)
            live = [layer.param.detach().clone() for layer in opt.layers]
            with opt.superposed():  # ... and the re-prune restores it
                for layer, weight in zip(opt.layers, live, strict=True):
                    superposed = layer.param.detach()
                    assert not torch.equal(superposed, weight)
                    counts = column_group_counts(superposed != 0)  # active weights may be 0
                    assert max(counts) == 1
                    assert sum(counts) > len(counts) // 2
    assert checked
    assert opt.tickets == 3
    opt.finalize()
    for layer in opt.layers:
        assert column_group_counts(layer.mask) == [1] * (layer.mask.numel() // 8)
        assert (layer.param.detach()[~layer.mask] == 0).all()
    with pytest.raises(ValueError, match=r"keeps structure='1 in 8 rows'.*'granet'"):
        SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "granet", structure=s,
                        total_steps=100)  # fmt: skip
