"""Deploying a trained sparse model: a compact checkpoint file and sparse inference modules.

- [`save_sparse`][sparseopt.export.save_sparse] / [`load_sparse`][sparseopt.export.load_sparse]:
  a checkpoint that holds only the active weights of the sparse tensors (their values, and their
  positions as a bitmask or as byte-sized gaps, whichever is smaller for that tensor) and the rest
  of the ``state_dict`` as it is. The file is
  [safetensors](https://github.com/huggingface/safetensors) when that package is installed (the
  ``export`` extra): a format that cannot hold code, read without unpickling anything. Without
  it, the same tensors go through ``torch.save`` and are read back with
  ``torch.load(weights_only=True)``, which unpickles only tensors and plain containers. Both
  files carry a header (format version, per-tensor encoding, shape, dtype, CRC-32 of each stored
  tensor) that ``load_sparse`` checks in full before it changes the model.
- [`to_sparse_inference`][sparseopt.export.to_sparse_inference]: a copy of a model whose sparse
  enough ``nn.Linear`` and 1x1 ``nn.Conv2d`` layers compute with ``torch.sparse`` (CSR or BSR).
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
import warnings
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _validate
from .structure import Structure, fits, parse_structure, structure_violations

__all__ = [
    "CondensedConv1x1",
    "CondensedLinear",
    "InferenceReport",
    "SemiStructuredLinear",
    "SparseConv1x1",
    "SparseLinear",
    "fan_in_min_sparsity_rule",
    "load_sparse",
    "min_sparsity_rule",
    "save_sparse",
    "semi_structured_unsupported",
    "to_sparse_inference",
]

_FORMAT = "sparseopt.sparse_checkpoint"
_VERSION = 1
_SEP = "::"  # stored tensor name = state_dict name + _SEP + part ("values", "pos", "neg")
_MAGIC_TORCH = b"PK"  # torch.save writes a zip archive


# --- positions: a packed bitmask or byte-sized gaps --------------------------------------------
_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device="cpu")


def _pack_bits(mask: Tensor) -> Tensor:
    """``np.packbits`` of a flat bool tensor, big-endian bit order, zero-padded to whole bytes."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BITS.to(flat.device)).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: Tensor, numel: int) -> Tensor:
    bits = (packed.view(-1, 1) & _BITS.to(packed.device)) != 0
    return bits.reshape(-1)[:numel]


def _gap_bytes(index: Tensor) -> Tensor:
    """Increasing flat indices as uint8 gaps: byte ``b > 0`` advances ``b`` and marks a position,
    byte 0 advances 255 and marks nothing. ``k`` indices over ``n`` elements take at most
    ``k + n // 255`` bytes."""
    gaps = torch.diff(index, prepend=index.new_full((1,), -1))  # >= 1
    skips = (gaps - 1) // 255
    ends = torch.cumsum(skips + 1, 0) - 1
    out = torch.zeros(int(ends[-1]) + 1 if ends.numel() else 0, dtype=torch.uint8, device="cpu")
    out[ends] = (gaps - 255 * skips).to(torch.uint8)
    return out


def _gap_index(code: Tensor) -> Tensor:
    steps = torch.where(code == 0, 255, code.to(torch.int64))
    return (torch.cumsum(steps, 0) - 1)[code != 0]


def _gap_size(index: Tensor) -> int:
    if index.numel() == 0:
        return 0
    gaps = torch.diff(index, prepend=index.new_full((1,), -1))
    return int(((gaps - 1) // 255 + 1).sum())


def _encode_positions(mask: Tensor) -> tuple[str, Tensor]:
    """The smaller of a packed bitmask and the gap bytes of a flat bool mask."""
    index = torch.nonzero(mask.reshape(-1)).reshape(-1)
    if _gap_size(index) < (mask.numel() + 7) // 8:
        return "gaps", _gap_bytes(index)
    return "bitmask", _pack_bits(mask)


def _decode_positions(kind: str, code: Tensor, numel: int) -> Tensor:
    """The flat bool mask of ``numel`` elements; ``ValueError`` if the code does not fit."""
    if kind == "bitmask":
        if code.numel() != (numel + 7) // 8:
            raise ValueError(f"a bitmask of {code.numel()} bytes for {numel} elements")
        return _unpack_bits(code, numel)
    if kind == "gaps":
        index = _gap_index(code)
        if index.numel() and int(index[-1]) >= numel:
            raise ValueError(f"a position {int(index[-1])} beyond {numel} elements")
        mask = torch.zeros(numel, dtype=torch.bool, device="cpu")
        mask[index] = True
        return mask
    raise ValueError(f"unknown position encoding {kind!r}")


# --- the file ------------------------------------------------------------------------------------
def _have_safetensors() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def _crc(t: Tensor) -> int:
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    return zlib.crc32(flat.numpy().tobytes()) if flat.numel() else 0


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _path(path: Any) -> str:
    """``path`` as a string, or a ``TypeError`` that names the argument."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"Expected path to be a str or os.PathLike, but got {_validate.type_of(path)}"
        )
    return os.fspath(path)


def _resolve_masks(
    model: nn.Module, masks: Mapping[Any, Tensor] | None, names: dict[str, Tensor]
) -> dict[str, Tensor]:
    """``{state_dict name: bool mask}`` from a mapping keyed by parameter tensors or by names."""
    if masks is None:
        return {}
    if not isinstance(masks, Mapping):
        raise TypeError(
            f"Expected masks to be a mapping (parameter or name -> bool mask) or None, but got "
            f"{type(masks).__name__}"
        )
    by_id: dict[int, list[str]] = {}
    for name, t in names.items():
        by_id.setdefault(id(t), []).append(name)
    out: dict[str, Tensor] = {}
    unknown = []
    for key, mask in masks.items():
        if isinstance(key, str):
            targets = [key] if key in names else []
        elif isinstance(key, Tensor):
            targets = by_id.get(id(key), [])
        else:
            raise TypeError(
                f"Expected the keys of masks to be parameters or names, but got "
                f"{type(key).__name__}"
            )
        if not targets:
            unknown.append(key if isinstance(key, str) else f"a tensor of shape {tuple(key.shape)}")
        for name in targets:
            out[name] = mask
    if unknown:
        raise ValueError(
            f"Expected masks to hold tensors of the model, but got {len(unknown)} others: "
            + ", ".join(map(str, unknown[:5]))
        )
    for name, mask in out.items():
        t = names[name]
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != t.shape:
            got = (
                f"{mask.dtype} {tuple(mask.shape)}"
                if isinstance(mask, Tensor)
                else type(mask).__name__
            )
            wrong_type = not isinstance(mask, Tensor) or mask.dtype != torch.bool
            raise (TypeError if wrong_type else ValueError)(
                f"Expected the mask of {name!r} to be a bool tensor of shape {tuple(t.shape)}, "
                f"but got {got}"
            )
        outside = int(torch.count_nonzero(t.detach()[~mask.to(t.device)]))
        if outside:
            raise ValueError(
                f"Expected the weights of {name!r} outside its mask to be 0, but got {outside} "
                "nonzeros (call opt.apply_masks() first, or pass no masks)"
            )
    return out


def save_sparse(
    model: nn.Module,
    path: str | os.PathLike[str],
    masks: Mapping[Any, Tensor] | None = None,
    *,
    zero_signs: bool = False,
) -> dict[str, Any]:
    """Write ``model.state_dict()`` to ``path`` with only the active weights of sparse tensors.

    A tensor is stored sparse when ``masks`` has a mask for it, or, for the other floating
    parameters with ``ndim >= 2``, when its nonzeros take fewer bytes than the dense tensor. A
    sparse tensor is its active values (in its own dtype) plus their positions, as a packed
    bitmask (one bit per weight) or as one byte per gap between positions (a zero byte skips 255),
    whichever is smaller: gaps below about 12% density (above 88% sparsity), the bitmask above.
    Everything else (biases, norms, buffers such as ``num_batches_tracked``) is stored as it is.

    The file is safetensors if the package is installed, otherwise a ``torch.save`` archive of
    tensors and strings only; [`load_sparse`][sparseopt.export.load_sparse] reads both.

    Args:
        model (nn.Module): the model; its ``state_dict()`` is saved.
        path (str | os.PathLike): the file to write (replaced if it exists).
        masks (Mapping | None): the active positions, a mapping from parameter tensors (such as
            ``SparseOptimizer.masks``) or ``state_dict`` names to bool masks of their shape. An
            active weight that is exactly 0 stays active in the file. Default: ``None``, the
            nonzeros of each tensor.
        zero_signs (bool): also store which inactive weights are ``-0.0`` (masking multiplies by
            0, so a negative weight becomes ``-0.0``), so that the loaded ``state_dict`` is
            bit-identical even in the sign bit of those zeros. It costs one more bitmask or gap
            stream per tensor that has any. Default: ``False``: inactive weights load as
            ``+0.0``, which compares equal and computes the same.

    Returns:
        A dict: ``file_bytes`` (size of the file), ``dense_bytes`` (bytes of the ``state_dict``'s
        tensors), ``format`` (``"safetensors"`` or ``"torch"``), and ``tensors``, one entry per
        ``state_dict`` name with its ``encoding`` (``"dense"``, ``"bitmask"`` or ``"gaps"``),
        ``numel`` and ``nnz`` (active weights).

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, ``path`` not a path, ``masks`` not a
            mapping of parameters or names to bool tensors, or ``zero_signs`` not a bool.
        ValueError: if a mask belongs to no tensor of the model, does not have its tensor's
            shape, or leaves nonzero weights outside it.

    Examples:
        >>> import os, tempfile, torch
        >>> from sparseopt import load_sparse, save_sparse
        >>> model = torch.nn.Linear(100, 100)
        >>> with torch.no_grad():
        ...     _ = model.weight.mul_(torch.rand(100, 100) < 0.1)
        >>> path = os.path.join(tempfile.mkdtemp(), "model.sparse")
        >>> info = save_sparse(model, path)
        >>> info["tensors"]["weight"]["encoding"], info["file_bytes"] < info["dense_bytes"] / 3
        ('gaps', True)
        >>> fresh = torch.nn.Linear(100, 100)
        >>> masks = load_sparse(fresh, path)
        >>> torch.equal(fresh.weight, model.weight)
        True
        >>> torch.equal(masks["weight"], model.weight != 0)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected model to be an nn.Module, but got {type(model).__name__}")
    zero_signs = _validate.boolean("zero_signs", zero_signs)
    path = _path(path)
    state = model.state_dict(keep_vars=True)
    params = {id(p) for p in model.parameters()}
    chosen = _resolve_masks(model, masks, state)
    tensors: dict[str, Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    dense_bytes = 0
    for name, value in state.items():
        if _SEP in name:
            raise ValueError(f"Expected state_dict names without {_SEP!r}, but got {name!r}")
        t = value.detach()
        dense_bytes += t.numel() * t.element_size()
        entry: dict[str, Any] = {
            "shape": list(t.shape),
            "dtype": _dtype_name(t.dtype),
            "numel": t.numel(),
        }
        mask = chosen.get(name)
        if mask is None and id(value) in params and t.ndim >= 2 and t.is_floating_point():
            nonzero = t != 0
            nnz = int(nonzero.sum())
            index_bytes = min((t.numel() + 7) // 8, nnz + t.numel() // 255 + 1)
            if nnz * t.element_size() + index_bytes < t.numel() * t.element_size():
                mask = nonzero
        cpu = t.cpu()
        if mask is None:
            entry["encoding"] = "dense"
            entry["nnz"] = t.numel()
            tensors[name] = cpu.clone().contiguous()
        else:
            mask = mask.detach().cpu()
            kind, pos = _encode_positions(mask)
            values = cpu[mask].contiguous()
            entry.update(encoding=kind, nnz=values.numel())
            tensors[name + _SEP + "values"] = values
            tensors[name + _SEP + "pos"] = pos
            if zero_signs and t.is_floating_point():
                negative = (cpu == 0) & torch.signbit(cpu) & ~mask
                if bool(negative.any()):
                    neg_kind, neg_pos = _encode_positions(negative)
                    entry["zero_signs"] = neg_kind
                    tensors[name + _SEP + "neg"] = neg_pos
        entries[name] = entry
    for key, t in tensors.items():
        part = key.rsplit(_SEP, 1)[-1] if _SEP in key else "dense"
        entries[key.rsplit(_SEP, 1)[0] if _SEP in key else key].setdefault("crc", {})[part] = _crc(
            t
        )
    if not any(e["encoding"] != "dense" for e in entries.values()):
        warnings.warn(
            "save_sparse stored every tensor dense (no masks given and no weight tensor sparse "
            "enough to pay): nothing was gained over torch.save",
            UserWarning,
            stacklevel=2,
        )
    header = {"format": _FORMAT, "version": str(_VERSION), "tensors": json.dumps(entries)}
    if _have_safetensors():
        from safetensors.torch import save_file

        save_file(tensors, path, metadata=header)
        fmt = "safetensors"
    else:
        torch.save({"header": header, "tensors": tensors}, path)
        fmt = "torch"
    return {
        "file_bytes": os.path.getsize(path),
        "dense_bytes": dense_bytes,
        "format": fmt,
        "tensors": {
            n: {"encoding": e["encoding"], "numel": e["numel"], "nnz": e["nnz"]}
            for n, e in entries.items()
        },
    }


def _read(path: str) -> tuple[dict[str, str], dict[str, Tensor]]:
    """The header and tensors of a file written by ``save_sparse``; ``ValueError`` if unreadable."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == _MAGIC_TORCH:
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path} is not a readable sparse checkpoint: {e}") from e
        if not (isinstance(obj, dict) and isinstance(obj.get("header"), dict)):
            raise ValueError(f"{path} is a torch file but not a sparse checkpoint")
        return obj["header"], obj["tensors"]
    if not _have_safetensors():
        raise ValueError(
            f"{path} is not a torch archive; reading a safetensors file needs the safetensors "
            "package (pip install 'sparseopt[export]')"
        )
    from safetensors.torch import load

    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
        tensors = load(data)
    except Exception as e:
        raise ValueError(f"{path} is not a readable sparse checkpoint: {e}") from e
    return header, tensors


def _decode(
    name: str, entry: Mapping[str, Any], tensors: Mapping[str, Tensor]
) -> tuple[Tensor, Tensor | None]:
    """The dense tensor of one entry (and its mask if it is stored sparse)."""
    shape, numel, kind = entry["shape"], entry["numel"], entry["encoding"]
    dtype = getattr(torch, entry["dtype"])
    crcs = entry["crc"]
    parts = {"dense": name} if kind == "dense" else {}
    if kind != "dense":
        parts = {p: name + _SEP + p for p in crcs}
    for part, key in parts.items():
        if key not in tensors:
            raise ValueError(f"{key!r} is missing")
        if _crc(tensors[key]) != crcs[part]:
            raise ValueError(f"{key!r} fails its checksum (the file is corrupted)")
    if math.prod(shape) != numel:
        raise ValueError(f"shape {shape} does not hold {numel} elements")
    if kind == "dense":
        t = tensors[name]
        if t.dtype != dtype or list(t.shape) != shape:
            raise ValueError(f"stored as {t.dtype} {list(t.shape)}, header says {dtype} {shape}")
        return t, None
    values = tensors[name + _SEP + "values"]
    mask = _decode_positions(kind, tensors[name + _SEP + "pos"], numel)
    if values.dtype != dtype or values.ndim != 1 or values.numel() != int(mask.sum()):
        raise ValueError(
            f"{values.numel()} {values.dtype} values for {int(mask.sum())} {dtype} positions"
        )
    out = torch.zeros(numel, dtype=dtype, device="cpu")
    if "zero_signs" in entry:
        out[_decode_positions(entry["zero_signs"], tensors[name + _SEP + "neg"], numel)] = -0.0
    out[mask] = values
    return out.view(shape), mask.view(shape)


def load_sparse(model: nn.Module, path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Load a file written by [`save_sparse`][sparseopt.export.save_sparse] into ``model``.

    The whole file is read and checked first: its header (format, version), every tensor's
    checksum and encoding, and that its names, shapes and dtypes are exactly those of
    ``model.state_dict()``. Only then is the ``state_dict`` loaded, so a file that does not fit,
    or is truncated or corrupted, leaves the model unchanged. Nothing is unpickled except, for a
    file written without safetensors, tensors and plain containers (``weights_only=True``).

    Args:
        model (nn.Module): the model to load into, built like the one saved (same names, shapes
            and dtypes); any device.
        path (str | os.PathLike): the file.

    Returns:
        ``{name: bool mask}`` of the active positions of every tensor stored sparse, on CPU
        (pass them on to rebuild a ``SparseOptimizer``'s masks, or to check them).

    Raises:
        TypeError: if ``model`` is not an ``nn.Module`` or ``path`` not a path.
        ValueError: if the file is not a sparse checkpoint of a known version, is truncated or
            corrupted, or does not fit the model (the message names the tensors).

    Examples:
        >>> import os, tempfile, torch
        >>> from sparseopt import load_sparse, save_sparse
        >>> path = os.path.join(tempfile.mkdtemp(), "model.sparse")
        >>> model = torch.nn.Linear(8, 4)
        >>> _ = save_sparse(model, path, masks={"weight": model.weight != 0})
        >>> load_sparse(torch.nn.Linear(8, 3), path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ... does not fit the model: weight: shape [4, 8] in the file, [3, 8] ...
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected model to be an nn.Module, but got {type(model).__name__}")
    path = _path(path)
    header, tensors = _read(path)
    if header.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a sparse checkpoint (no {_FORMAT!r} header)")
    if header.get("version") != str(_VERSION):
        raise ValueError(
            f"Expected a sparse checkpoint of version {_VERSION}, but got version "
            f"{header.get('version')!r} in {path}"
        )
    try:
        entries = json.loads(header["tensors"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} has an unreadable header: {e}") from e
    target = model.state_dict()
    problems = [f"{n}: missing from the file" for n in target if n not in entries]
    problems += [f"{n}: in the file, not in the model" for n in entries if n not in target]
    for name, t in target.items():
        entry = entries.get(name)
        if entry is None:
            continue
        if entry.get("shape") != list(t.shape):
            problems.append(
                f"{name}: shape {entry.get('shape')} in the file, {list(t.shape)} in the model"
            )
        if entry.get("dtype") != _dtype_name(t.dtype):
            problems.append(
                f"{name}: dtype {entry.get('dtype')} in the file, {_dtype_name(t.dtype)} in "
                "the model"
            )
    if problems:
        raise ValueError(f"{path} does not fit the model: " + "; ".join(problems))
    loaded: dict[str, Tensor] = {}
    masks: dict[str, Tensor] = {}
    for name, entry in entries.items():
        try:
            loaded[name], mask = _decode(name, entry, tensors)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
            raise ValueError(f"{path} is corrupted at {name!r}: {e}") from e
        if mask is not None:
            masks[name] = mask
    model.load_state_dict(loaded, strict=True)
    return masks


# --- sparse inference ----------------------------------------------------------------------------
_LAYOUTS = ("csr", "bsr")


def _check_layout(layout: Any) -> None:
    if not isinstance(layout, str):
        raise TypeError(f"Expected layout to be a str, but got {_validate.type_of(layout)}")
    if layout not in _LAYOUTS:
        raise ValueError(f"Expected layout to be one of {_LAYOUTS}, but got {layout!r}")


def min_sparsity_rule(numel: int, batch_size: int) -> float:
    """The sparsity above which a CSR layer beat dense on CPU in our measurement.

    Measured with ``benchmarks/inference.py`` (torch 2.13, MKL sparse kernels, one thread; the
    table is in ``docs/benchmarks.md``): per-call overhead makes small layers need more sparsity
    than large ones, and a few input rows need more than a batch. A layer of at most 2**16
    weights (256x256) never won; one of at most 2**18 (512x512) won only at batch 64, from 90%;
    larger ones won at batch 1 from 95% and at batch 8 and 64 from 90%.

    Args:
        numel (int): the layer's weight count.
        batch_size (int): rows of the GEMM (the batch; for a 1x1 convolution at least the batch).

    Returns:
        The minimum sparsity in ``[0, 1]`` at which the layer is converted (1.0: only an all-zero
        layer).

    Raises:
        TypeError: if ``numel`` or ``batch_size`` is not an int.
        ValueError: if ``numel`` is negative or ``batch_size`` is not positive.

    Examples:
        >>> min_sparsity_rule(2048 * 512, 1), min_sparsity_rule(2048 * 512, 8)
        (0.95, 0.9)
        >>> min_sparsity_rule(512 * 512, 8), min_sparsity_rule(512 * 512, 64)
        (0.99, 0.9)
    """
    numel = _validate.integer("numel", numel, 0)
    batch_size = _validate.integer("batch_size", batch_size, 1)
    if numel <= 1 << 16:
        return 1.0
    if numel <= 1 << 18:
        return 0.9 if batch_size >= 64 else 0.99
    return 0.9 if batch_size >= 8 else 0.95


class SparseLinear(nn.Module):
    """``nn.Linear`` computing with a ``torch.sparse`` CSR or BSR weight (inference).

    The compressed weight is kept as plain dense buffers (``crow_indices``, ``col_indices``,
    ``values``) and wrapped into a sparse tensor at each call (no copy), so the module
    deep-copies, saves and loads like any other. Built by
    [`to_sparse_inference`][sparseopt.export.to_sparse_inference].

    Args:
        linear (nn.Linear): the dense layer (float32 or float64); its weight is compressed.
        layout (str): ``"csr"`` or ``"bsr"``. Default: ``"csr"``.
        blocksize (int): the square block of ``"bsr"``; must divide both weight dimensions.
            Default: 4.

    Raises:
        TypeError: if ``linear`` is not an ``nn.Linear``, ``layout`` not a string or
            ``blocksize`` not an int.
        ValueError: if ``layout`` is unknown or ``blocksize`` does not divide the weight.

    Examples:
        >>> import torch
        >>> from sparseopt.export import SparseLinear
        >>> dense = torch.nn.Linear(8, 4)
        >>> sparse = SparseLinear(dense)
        >>> x = torch.randn(3, 8)
        >>> torch.allclose(sparse(x), dense(x), atol=1e-6)
        True
    """

    def __init__(self, linear: nn.Linear, layout: str = "csr", blocksize: int = 4) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Expected linear to be an nn.Linear, but got {type(linear).__name__}")
        _check_layout(layout)
        blocksize = _validate.integer("blocksize", blocksize, 1)
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.layout = layout
        if layout == "bsr" and (weight.shape[0] % blocksize or weight.shape[1] % blocksize):
            raise ValueError(
                f"Expected blocksize to divide the weight's shape {tuple(weight.shape)}, "
                f"but got {blocksize}"
            )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
            if layout == "bsr":
                compressed = weight.to_sparse_bsr((blocksize, blocksize))
            else:
                compressed = weight.to_sparse_csr()
        self.register_buffer("crow_indices", compressed.crow_indices().clone())
        self.register_buffer("col_indices", compressed.col_indices().clone())
        self.register_buffer("values", compressed.values().clone())
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias)

    def sparse_weight(self) -> Tensor:
        """The weight as a sparse CSR or BSR tensor (a view of the buffers).

        Returns:
            A ``torch.sparse_csr`` or ``torch.sparse_bsr`` tensor of shape
            ``(out_features, in_features)``.

        Examples:
            >>> import torch
            >>> from sparseopt.export import SparseLinear
            >>> SparseLinear(torch.nn.Linear(8, 4)).sparse_weight().layout
            torch.sparse_csr
        """
        size = [self.out_features, self.in_features]
        layout = torch.sparse_bsr if self.layout == "bsr" else torch.sparse_csr
        if torch.jit.is_scripting():  # TorchScript does not know check_invariants
            return torch.sparse_compressed_tensor(
                self.crow_indices, self.col_indices, self.values, size, layout=layout
            )
        return torch.sparse_compressed_tensor(
            self.crow_indices,
            self.col_indices,
            self.values,
            size,
            layout=layout,
            check_invariants=False,
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x @ weight.T + bias`` over the last dimension of ``x``.

        Args:
            x (Tensor): ``(*, in_features)``.

        Returns:
            ``(*, out_features)``.

        Examples:
            >>> import torch
            >>> from sparseopt.export import SparseLinear
            >>> SparseLinear(torch.nn.Linear(8, 4))(torch.randn(2, 5, 8)).shape
            torch.Size([2, 5, 4])
        """
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 1:  # a matrix-vector product: MKL's sparse mv is 2-3x faster
            out = torch.mv(self.sparse_weight(), rows[0]).unsqueeze(0)
        else:
            out = torch.sparse.mm(self.sparse_weight(), rows.t()).t()
        if self.bias is not None:
            out = out + self.bias
        shape = list(x.shape[:-1])
        shape.append(self.out_features)
        return out.reshape(shape)

    def extra_repr(self) -> str:
        nnz = self.values.numel()
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"layout={self.layout}, nnz={nnz}, bias={self.bias is not None}"
        )


class SparseConv1x1(SparseLinear):
    """A 1x1 ``nn.Conv2d`` (stride 1, no padding, one group) as a sparse GEMM over the pixels.

    Args:
        conv (nn.Conv2d): the dense layer; its ``(out, in, 1, 1)`` weight is compressed.
        layout (str): ``"csr"`` or ``"bsr"``. Default: ``"csr"``.
        blocksize (int): the square block of ``"bsr"``. Default: 4.

    Raises:
        TypeError: if ``conv`` is not an ``nn.Conv2d``, or as for
            [`SparseLinear`][sparseopt.export.SparseLinear].
        ValueError: if ``conv`` is not a 1x1, stride-1, unpadded, single-group convolution, or
            as for [`SparseLinear`][sparseopt.export.SparseLinear].

    Examples:
        >>> import torch
        >>> from sparseopt.export import SparseConv1x1
        >>> dense = torch.nn.Conv2d(8, 4, 1)
        >>> x = torch.randn(2, 8, 5, 5)
        >>> torch.allclose(SparseConv1x1(dense)(x), dense(x), atol=1e-6)
        True
    """

    def __init__(self, conv: nn.Conv2d, layout: str = "csr", blocksize: int = 4) -> None:
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"Expected conv to be an nn.Conv2d, but got {type(conv).__name__}")
        reason = _conv_unsupported(conv)
        if reason:
            raise ValueError(
                f"Expected a 1x1, stride-1, unpadded, ungrouped conv, but got {reason}"
            )
        linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None)
        linear.weight = nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1))
        linear.bias = conv.bias
        super().__init__(linear, layout, blocksize)

    def forward(self, x: Tensor) -> Tensor:
        """The convolution of ``x``, ``(N, C_in, H, W) -> (N, C_out, H, W)``.

        Args:
            x (Tensor): ``(N, in_channels, H, W)``.

        Returns:
            ``(N, out_channels, H, W)``, contiguous.

        Examples:
            >>> import torch
            >>> from sparseopt.export import SparseConv1x1
            >>> SparseConv1x1(torch.nn.Conv2d(8, 4, 1))(torch.randn(2, 8, 3, 3)).shape
            torch.Size([2, 4, 3, 3])
        """
        n, c, h, w = x.shape
        cols = x.transpose(0, 1).reshape(c, n * h * w)
        out = torch.sparse.mm(self.sparse_weight(), cols)
        if self.bias is not None:
            out = out + self.bias.unsqueeze(1)
        return out.reshape(self.out_features, n, h, w).transpose(0, 1).contiguous()

    def extra_repr(self) -> str:
        return "kernel_size=(1, 1), " + super().extra_repr()


def _conv_unsupported(conv: nn.Conv2d) -> str:
    if conv.kernel_size != (1, 1):
        return f"kernel {conv.kernel_size}"
    if conv.stride != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros":
        return f"stride {conv.stride}, groups {conv.groups}, padding mode {conv.padding_mode}"
    if conv.padding not in ((0, 0), "valid"):
        return f"padding {conv.padding}"
    return ""


# --- structured inference: constant fan-in (condensed) and 2:4 (semi-structured) ---------------
_COMPILED_GATHER: Any = None


def _gather_multiply_sum(rows: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """``out[b, o] = sum_j rows[b, indices[o, j]] * values[o, j]``: the fused formulation that
    ``torch.compile`` turns into one loop (SRigL's condensed layer)."""
    return (rows[:, indices] * values).sum(-1)


def _compiled_gather() -> Any:
    global _COMPILED_GATHER
    if _COMPILED_GATHER is None:
        _COMPILED_GATHER = torch.compile(_gather_multiply_sum)
    return _COMPILED_GATHER


def _constant_fan_in(active: Tensor) -> tuple[int, int, int]:
    """``(k, fewest, most)`` active per row of a 2-D bool mask (``k`` is row 0's count)."""
    counts = active.sum(1)
    if counts.numel() == 0:
        return 0, 0, 0
    return int(counts[0]), int(counts.min()), int(counts.max())


def _check_mask(mask: Any, shape: torch.Size) -> None:
    """A ``TypeError`` unless ``mask`` is a bool tensor, a ``ValueError`` unless of ``shape``."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = f"{mask.dtype} tensor" if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"Expected mask to be a bool tensor or None, but got {got}")
    if mask.shape != shape:
        raise ValueError(
            f"Expected mask of the weight's shape {tuple(shape)}, but got {tuple(mask.shape)}"
        )


class CondensedLinear(nn.Module):
    """``nn.Linear`` whose rows each hold the same number ``k`` of active weights (constant
    fan-in), stored condensed: ``values`` and ``indices`` of shape ``(out_features, k)``.

    Row ``o`` computes ``sum_j x[..., indices[o, j]] * values[o, j] + bias[o]``. Two eager
    kernels run it, chosen by what measured fastest on CPU (``benchmarks/structured_inference.py``,
    ``docs/benchmarks.md``): for one input row, ``torch.mv`` with a CSR view of the same buffers
    (every row pointer is ``o * k``; float16/bfloat16: ``index_select`` plus ``vecdot``); for more
    rows, ``F.embedding_bag`` over the transposed input with ``values`` as per-sample weights (one
    pass, no ``(rows, out, k)`` intermediate). ``compile=True`` runs instead the fused
    gather-multiply-sum ``(x[:, indices] * values).sum(-1)`` through ``torch.compile`` (SRigL's
    formulation); it was not faster on CPU in our measurement, hence off by default.

    Built by [`to_sparse_inference`][sparseopt.export.to_sparse_inference] for layers whose mask
    has constant fan-in (``SparseOptimizer(structure="fan_in")``); indices are int32 (int64 for
    more than ``2**31 - 1`` inputs), ascending inside each row.

    Args:
        linear (nn.Linear): the dense layer (masked weights exactly 0), any float dtype.
        mask (Tensor | None): the active positions, a bool tensor of the weight's shape whose
            rows each hold the same count. An active weight may be exactly 0. Default: ``None``,
            the nonzeros of the weight (then every row must hold the same number of nonzeros).
        compile (bool): run the ``torch.compile``-d fused gather instead of the eager kernels.
            Default: ``False`` (the eager kernels measured faster on CPU).

    Raises:
        TypeError: if ``linear`` is not an ``nn.Linear``, ``mask`` not a bool tensor or
            ``compile`` not a bool.
        ValueError: if the mask does not have the weight's shape, leaves nonzero weights
            outside it, or its rows hold different counts.

    Examples:
        >>> import torch
        >>> from sparseopt.export import CondensedLinear
        >>> dense = torch.nn.Linear(8, 4)
        >>> mask = torch.zeros(4, 8, dtype=torch.bool)
        >>> mask[:, :2] = True  # two active inputs per output
        >>> with torch.no_grad():
        ...     _ = dense.weight.mul_(mask)
        >>> condensed = CondensedLinear(dense, mask)
        >>> condensed.values.shape, condensed.indices.dtype
        (torch.Size([4, 2]), torch.int32)
        >>> x = torch.randn(3, 8)
        >>> torch.allclose(condensed(x), dense(x), atol=1e-6)
        True
    """

    def __init__(
        self, linear: nn.Linear, mask: Tensor | None = None, *, compile: bool = False
    ) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Expected linear to be an nn.Linear, but got {type(linear).__name__}")
        compile = _validate.boolean("compile", compile)
        weight = linear.weight.detach()
        if weight.ndim != 2:
            raise ValueError(f"Expected a 2-D weight, but got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        if mask is None:
            active = weight != 0
        else:
            _check_mask(mask, weight.shape)
            active = mask.to(weight.device)
            outside = int(torch.count_nonzero(weight[~active]))
            if outside:
                raise ValueError(
                    f"Expected the weights outside the mask to be 0, but got {outside} nonzeros"
                )
        k, fewest, most = _constant_fan_in(active)
        if fewest != most:
            raise ValueError(
                "Expected every row to hold the same number of active weights (constant "
                f"fan-in), but rows hold {fewest} to {most}"
                + ("" if mask is not None else " nonzeros (pass the mask if some are exactly 0)")
            )
        self.k = k
        self.use_compile = compile  # not .compile: nn.Module.compile is a method
        index_dtype = torch.int32 if self.in_features < 2**31 else torch.int64
        # positions of the active weights, ascending within each row
        order = torch.sort(active.to(torch.uint8), dim=1, descending=True, stable=True).indices
        indices = order[:, :k].contiguous()
        self.register_buffer("values", weight.gather(1, indices).contiguous())
        self.register_buffer("indices", indices.to(index_dtype))
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias)
        crow = torch.arange(self.out_features + 1, device=weight.device) * k  # row o: o * k
        self.register_buffer("crow_indices", crow.to(index_dtype), persistent=False)
        with warnings.catch_warnings():  # torch warns once per process that CSR is in beta
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
            empty = torch.zeros(0, dtype=torch.int64, device="cpu")  # a CPU dummy, on purpose
            torch.sparse_csr_tensor(
                torch.zeros(2, dtype=torch.int64, device="cpu"),
                empty,
                empty.float(),
                (1, 1),
                check_invariants=True,
            )

    def dense_weight(self) -> Tensor:
        """The weight as a dense ``(out_features, in_features)`` tensor (zeros elsewhere).

        Returns:
            A new tensor of ``values``' dtype and device.

        Examples:
            >>> import torch
            >>> from sparseopt.export import CondensedLinear
            >>> dense = torch.nn.Linear(4, 2, bias=False)
            >>> with torch.no_grad():
            ...     _ = dense.weight.copy_(torch.tensor([[0.0, 1, 0, 2], [3, 0, 4, 0]]))
            >>> torch.equal(CondensedLinear(dense).dense_weight(), dense.weight)
            True
        """
        out = self.values.new_zeros(self.out_features, self.in_features)
        return out.scatter_(1, self.indices.long(), self.values)

    @torch.jit.unused
    def _fused(self, rows):  # no annotations: TorchScript cannot resolve them here
        return _compiled_gather()(rows, self.indices, self.values)

    def _matvec(self, row: Tensor) -> Tensor:
        use_csr = self.values.dtype in (torch.float32, torch.float64)
        if not torch.jit.is_scripting():  # no fake-tensor rule builds a CSR tensor (export)
            use_csr = use_csr and not torch.compiler.is_compiling()
        if use_csr:  # a CSR view of the same buffers: MKL's sparse mv
            cols, values = self.indices.reshape(-1), self.values.reshape(-1)
            size = [self.out_features, self.in_features]
            if torch.jit.is_scripting():  # TorchScript does not know check_invariants
                csr = torch.sparse_compressed_tensor(
                    self.crow_indices, cols, values, size, layout=torch.sparse_csr
                )
            else:
                csr = torch.sparse_compressed_tensor(
                    self.crow_indices,
                    cols,
                    values,
                    size,
                    layout=torch.sparse_csr,
                    check_invariants=False,
                )
            return torch.mv(csr, row)
        gathered = row.index_select(0, self.indices.reshape(-1)).view_as(self.values)
        return torch.linalg.vecdot(gathered, self.values)

    def forward(self, x: Tensor) -> Tensor:
        """``x @ weight.T + bias`` over the last dimension of ``x``.

        Args:
            x (Tensor): ``(*, in_features)``, the dtype of the weight.

        Returns:
            ``(*, out_features)``.

        Examples:
            >>> import torch
            >>> from sparseopt.export import CondensedLinear
            >>> CondensedLinear(torch.nn.Linear(8, 4))(torch.randn(2, 5, 8)).shape
            torch.Size([2, 5, 4])
        """
        rows = x.reshape(-1, self.in_features)
        if self.k == 0:  # an all-zero weight (F.embedding_bag refuses empty bags)
            out = rows.new_zeros(rows.shape[0], self.out_features)
        elif self.use_compile:
            out = self._fused(rows)
        elif rows.shape[0] == 1:
            out = self._matvec(rows[0]).unsqueeze(0)
        else:  # out.T[o] = sum_j values[o, j] * rows.T[indices[o, j]]
            out = F.embedding_bag(
                self.indices, rows.t().contiguous(), per_sample_weights=self.values, mode="sum"
            ).t()
        if self.bias is not None:
            out = out + self.bias
        shape = list(x.shape[:-1])
        shape.append(self.out_features)
        return out.reshape(shape)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
            f"bias={self.bias is not None}, compile={self.use_compile}"
        )


class CondensedConv1x1(CondensedLinear):
    """A 1x1 ``nn.Conv2d`` (stride 1, no padding, one group) with constant fan-in, condensed
    like [`CondensedLinear`][sparseopt.export.CondensedLinear] and run over the pixels.

    Args:
        conv (nn.Conv2d): the dense layer; its ``(out, in, 1, 1)`` weight is condensed.
        mask (Tensor | None): the active positions, of the conv weight's shape. Default:
            ``None``, the nonzeros.
        compile (bool): as for ``CondensedLinear``. Default: ``False``.

    Raises:
        TypeError: if ``conv`` is not an ``nn.Conv2d``, or as for ``CondensedLinear``.
        ValueError: if ``conv`` is not a 1x1, stride-1, unpadded, single-group convolution, its
            mask does not have the conv weight's shape, or as for ``CondensedLinear``.

    Examples:
        >>> import torch
        >>> from sparseopt.export import CondensedConv1x1
        >>> dense = torch.nn.Conv2d(8, 4, 1)
        >>> with torch.no_grad():
        ...     _ = dense.weight[:, 4:].zero_()
        >>> x = torch.randn(2, 8, 5, 5)
        >>> torch.allclose(CondensedConv1x1(dense)(x), dense(x), atol=1e-5)
        True
    """

    def __init__(
        self, conv: nn.Conv2d, mask: Tensor | None = None, *, compile: bool = False
    ) -> None:
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"Expected conv to be an nn.Conv2d, but got {type(conv).__name__}")
        reason = _conv_unsupported(conv)
        if reason:
            raise ValueError(
                f"Expected a 1x1, stride-1, unpadded, ungrouped conv, but got {reason}"
            )
        if mask is not None:
            _check_mask(mask, conv.weight.shape)
        linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None)
        linear.weight = nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1))
        linear.bias = conv.bias
        flat_mask = None if mask is None else mask.reshape(conv.out_channels, -1)
        super().__init__(linear, flat_mask, compile=compile)

    def forward(self, x: Tensor) -> Tensor:
        """The convolution of ``x``, ``(N, C_in, H, W) -> (N, C_out, H, W)``.

        Args:
            x (Tensor): ``(N, in_features, H, W)``.

        Returns:
            ``(N, out_features, H, W)``, contiguous.

        Examples:
            >>> import torch
            >>> from sparseopt.export import CondensedConv1x1
            >>> CondensedConv1x1(torch.nn.Conv2d(8, 4, 1))(torch.randn(2, 8, 3, 3)).shape
            torch.Size([2, 4, 3, 3])
        """
        n, c, h, w = x.shape
        if self.k == 0 or self.use_compile:
            rows = x.permute(0, 2, 3, 1).reshape(-1, c)
            out = super().forward(rows)  # bias included
            return out.reshape(n, h, w, self.out_features).permute(0, 3, 1, 2).contiguous()
        cols = x.transpose(0, 1).reshape(c, n * h * w)  # the transposed GEMM input
        out = F.embedding_bag(self.indices, cols, per_sample_weights=self.values, mode="sum")
        if self.bias is not None:
            out = out + self.bias.unsqueeze(1)
        return out.reshape(self.out_features, n, h, w).transpose(0, 1).contiguous()

    def extra_repr(self) -> str:
        return "kernel_size=(1, 1), " + super().extra_repr()


def semi_structured_unsupported(weight: Tensor) -> str:
    """Why a 2:4 weight cannot run with ``torch.sparse.to_sparse_semi_structured``, or ``""``.

    The checks: a 2-D weight on a CUDA device of compute capability at least 8.0 (Ampere or
    newer), in float16 or bfloat16 (float32 weights are not cast silently: cast the model
    first), whose shape is a multiple of the selected backend's minimum sparse tile
    (cuSPARSELt: 16x16; CUTLASS: 32x64, for 16-bit types). Whether the mask is 2:4 is not
    checked here.

    Args:
        weight (Tensor): the ``(out_features, in_features)`` weight.

    Returns:
        The reason, or ``""`` when the conversion can be tried.

    Raises:
        TypeError: if ``weight`` is not a tensor.

    Examples:
        >>> import torch
        >>> print(semi_structured_unsupported(torch.zeros(64, 64)))  # doctest: +ELLIPSIS
        semi-structured 2:4 kernels need a CUDA device ... but the weight is on cpu
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"Expected weight to be a tensor, but got {_validate.type_of(weight)}")
    if weight.ndim != 2:
        return f"semi-structured 2:4 needs a 2-D weight, not shape {tuple(weight.shape)}"
    if weight.device.type != "cuda":
        return (
            "semi-structured 2:4 kernels need a CUDA device of compute capability >= 8.0, but "
            f"the weight is on {weight.device}"
        )
    major, minor = torch.cuda.get_device_capability(weight.device)
    if (major, minor) < (8, 0):
        return (
            "semi-structured 2:4 kernels need compute capability >= 8.0, but "
            f"{torch.cuda.get_device_name(weight.device)} has {major}.{minor}"
        )
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return (
            f"semi-structured 2:4 takes float16/bfloat16 weights, not {_dtype_name(weight.dtype)} "
            "(cast the model with .half() or .to(torch.bfloat16) first)"
        )
    rows, cols = _semi_structured_tile(weight.dtype)
    if weight.shape[0] % rows or weight.shape[1] % cols:
        return (
            f"semi-structured 2:4 needs a weight shape that is a multiple of ({rows}, {cols}), "
            f"not {tuple(weight.shape)}"
        )
    return ""


def _semi_structured_tile(dtype: torch.dtype) -> tuple[int, int]:
    """The minimum sparse tile of the backend ``to_sparse_semi_structured`` will use."""
    from torch.sparse import semi_structured as ss

    cusparselt = getattr(torch.backends, "cusparselt", None)
    use_cutlass = ss.SparseSemiStructuredTensor._FORCE_CUTLASS or not (
        cusparselt is not None and cusparselt.is_available()
    )
    cls = (
        ss.SparseSemiStructuredTensorCUTLASS
        if use_cutlass
        else (ss.SparseSemiStructuredTensorCUSPARSELT)
    )
    try:
        c = cls._DTYPE_SHAPE_CONSTRAINTS[dtype]
        return int(c.sparse_min_rows), int(c.sparse_min_cols)
    except (AttributeError, KeyError):  # a torch that moved them: the strictest known tile
        return 32, 64


class SemiStructuredLinear(nn.Module):
    """``nn.Linear`` with a 2:4 weight compressed by ``torch.sparse.to_sparse_semi_structured``
    (cuSPARSELt or CUTLASS sparse tensor cores; CUDA, compute capability >= 8.0, float16 or
    bfloat16).

    The weight is held as a ``SparseSemiStructuredTensor`` parameter (``requires_grad=False``)
    and ``F.linear`` dispatches to the sparse kernel. For inference only; save the dense masked
    model (``save_sparse``) and convert after loading, rather than saving this module.

    Args:
        linear (nn.Linear): the dense layer whose weight holds 2 nonzeros (at most) in every
            group of 4 consecutive inputs.

    Raises:
        TypeError: if ``linear`` is not an ``nn.Linear``.
        ValueError: if the weight cannot be converted (see
            [`semi_structured_unsupported`][sparseopt.export.semi_structured_unsupported]) or
            is not 2:4.

    Examples:
        >>> import torch
        >>> from sparseopt.export import SemiStructuredLinear
        >>> SemiStructuredLinear(torch.nn.Linear(64, 64))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ... need a CUDA device of compute capability >= 8.0, but the weight is on cpu
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Expected linear to be an nn.Linear, but got {type(linear).__name__}")
        weight = linear.weight.detach()
        reason = semi_structured_unsupported(weight)
        if reason:
            raise ValueError(f"Expected linear to be convertible to 2:4, but {reason}")
        groups = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
        over = int((groups > 2).sum())
        if over:
            raise ValueError(
                "Expected linear to hold at most 2 nonzeros in every group of 4 inputs (2:4), "
                f"but {over} of {groups.numel()} groups hold more"
            )
        from torch.sparse import to_sparse_semi_structured

        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(
            to_sparse_semi_structured(weight.contiguous()), requires_grad=False
        )
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x @ weight.T + bias`` with the 2:4 sparse kernel.

        Args:
            x (Tensor): ``(*, in_features)``, the weight's dtype and device.

        Returns:
            ``(*, out_features)``.

        Examples:
            >>> import torch
            >>> from sparseopt.export import SemiStructuredLinear
            >>> callable(SemiStructuredLinear.forward)  # needs a CUDA device to run
            True
        """
        return F.linear(x.contiguous(), self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"structure=2:4, bias={self.bias is not None}"
        )


class InferenceReport(list):
    """What [`to_sparse_inference`][sparseopt.export.to_sparse_inference] did, one row per layer.

    A ``list`` of dicts with ``name``, ``type``, ``shape``, ``sparsity``, ``converted`` (the
    layout: ``"csr"``, ``"bsr"``, ``"condensed"`` or ``"2:4"``; ``None`` when the layer stayed
    dense), ``structure`` (``"2:4"``, another ``"N:M"``, ``"fan_in"``, or ``None``: unstructured
    or not looked for) and ``reason``. It prints as a table.

    Args:
        iterable (Iterable[dict]): the rows. Default: none.

    Examples:
        >>> row = {"name": "fc", "type": "Linear", "shape": (4, 8), "sparsity": 0.95,
        ...        "converted": "csr", "reason": "sparsity 0.950 reaches 0.900"}
        >>> report = InferenceReport([row])
        >>> report.converted
        ['fc']
    """

    def __init__(self, iterable: Iterable[dict[str, Any]] = ()) -> None:
        super().__init__(iterable)

    @property
    def converted(self) -> list[str]:
        """Names of the layers now computing sparse.

        Returns:
            The names, in module order.

        Examples:
            >>> InferenceReport([]).converted
            []
        """
        return [r["name"] for r in self if r["converted"]]

    def __str__(self) -> str:
        lines = [f"{'layer':<32} {'type':<10} {'sparsity':>8}  {'as':<9} reason"]
        for r in self:
            sp = "" if r["sparsity"] is None else f"{r['sparsity']:.3f}"
            lines.append(
                f"{r['name']:<32} {r['type']:<10} {sp:>8}  {r['converted'] or 'dense':<9} "
                f"{r['reason']}"
            )
        return "\n".join(lines)


def _block_for(shape: tuple[int, ...]) -> int | None:
    for b in (16, 8, 4, 2):
        if shape[0] % b == 0 and shape[1] % b == 0:
            return b
    return None


def fan_in_min_sparsity_rule(numel: int, batch_size: int) -> float:
    """The sparsity above which a constant fan-in layer, condensed, beat dense on CPU.

    Measured with ``benchmarks/structured_inference.py`` (torch 2.13, one thread; the table is in
    ``docs/benchmarks.md``): [`CondensedLinear`][sparseopt.export.CondensedLinear] against
    ``F.linear`` on 256x256, 512x512, 1024x1024 and 4096x4096 layers at 80, 90 and 95% sparsity,
    batch 1, 8 and 64, in three runs. A layer of at most 2**16 weights (256x256) lost or tied
    (it won by a few percent only at batch 64). One of at most 2**18 (512x512) won at batch 64
    from 90% (1.9-2.4x) and was a toss-up below (0.84-1.35x). Larger ones won at 90% and 95% at
    every batch (1.4-10x), and at 80% at batch 64 (1.35-2.0x, one run 0.82x); at 80% below
    batch 64 the result flipped from run to run. Below 80% was not measured: left dense.

    Args:
        numel (int): the layer's weight count.
        batch_size (int): rows of the GEMM (the batch; for a 1x1 convolution at least the batch).

    Returns:
        The minimum sparsity in ``[0, 1]`` at which the layer is condensed (1.0: never).

    Raises:
        TypeError: if ``numel`` or ``batch_size`` is not an int.
        ValueError: if ``numel`` is negative or ``batch_size`` is not positive.

    Examples:
        >>> fan_in_min_sparsity_rule(4096 * 4096, 1), fan_in_min_sparsity_rule(4096 * 4096, 64)
        (0.9, 0.8)
        >>> fan_in_min_sparsity_rule(512 * 512, 1), fan_in_min_sparsity_rule(512 * 512, 64)
        (1.0, 0.9)
        >>> fan_in_min_sparsity_rule(256 * 256, 64)
        1.0
    """
    numel = _validate.integer("numel", numel, 0)
    batch_size = _validate.integer("batch_size", batch_size, 1)
    if numel <= 1 << 16:
        return 1.0
    if numel <= 1 << 18:
        return 0.9 if batch_size >= 64 else 1.0
    return 0.8 if batch_size >= 64 else 0.9


def _layer_structure(active: Tensor, wanted: Structure | str) -> tuple[str | None, int, str]:
    """``(label, k, why)`` for a 2-D mask: ``label`` is ``"2:4"``, another ``"N:M"`` or
    ``"fan_in"`` when the mask holds it (``k``: active per row), else ``None`` and ``why``."""
    rows, fan_in = active.shape
    k, fewest, most = _constant_fan_in(active)
    constant = fewest == most and 0 < k < fan_in
    if wanted == "auto":
        two_four = constant and fits(active.shape, "2:4") and k * 2 == fan_in
        if two_four and structure_violations(active, "2:4") == 0:
            return "2:4", k, ""
        if constant:
            return "fan_in", k, ""
        return None, k, f"no structure found (rows hold {fewest} to {most} active)"
    assert isinstance(wanted, Structure)
    if wanted.kind == "nm":
        if not fits(active.shape, wanted):
            return None, k, f"fan-in {fan_in} is not a multiple of {wanted.m}: not {wanted}"
        bad = structure_violations(active, wanted)
        if bad:
            groups = rows * (fan_in // wanted.m)
            return None, k, f"not {wanted}: {bad} of {groups} groups hold another count"
        return str(wanted), k, ""
    if not constant:
        return None, k, f"not constant fan-in (rows hold {fewest} to {most} active)"
    return "fan_in", k, ""


def to_sparse_inference(
    model: nn.Module,
    *,
    min_sparsity: float | None = None,
    layout: str = "csr",
    batch_size: int = 1,
    blocksize: int | None = None,
    structure: str | None = None,
    masks: Mapping[Any, Tensor] | None = None,
) -> nn.Module:
    """A copy of ``model`` whose sparse enough layers compute with sparse kernels (inference).

    Unstructured (``structure=None``, the default): each ``nn.Linear`` and each 1x1
    ``nn.Conv2d`` (stride 1, no padding, one group) whose weight is float32 or float64 and at
    least ``min_sparsity`` sparse becomes a [`SparseLinear`][sparseopt.export.SparseLinear] or
    [`SparseConv1x1`][sparseopt.export.SparseConv1x1] (CSR or BSR). Other layers stay dense:
    larger convolutions (im2col plus a sparse GEMM lost to oneDNN's dense convolution in our
    measurement), half-precision weights (torch's CPU CSR kernels take float32/float64 only) and
    every other module type.

    Structured (``structure="auto"``, ``"fan_in"`` or ``"N:M"``, as trained with
    ``SparseOptimizer(structure=...)``): a layer whose mask holds the structure is converted by
    it, the others as above (with the reason in the report):

    - 2:4 ``nn.Linear`` on a CUDA device of compute capability >= 8.0, float16/bfloat16:
      [`SemiStructuredLinear`][sparseopt.export.SemiStructuredLinear]
      (``torch.sparse.to_sparse_semi_structured``), whatever ``min_sparsity`` says. Elsewhere
      (CPU, older GPUs, float32, shapes off the kernel's tile) the report says why, and the
      layer is treated as constant fan-in (a 2:4 mask has ``in_features / 2`` per row).
    - Constant fan-in (and any other ``N:M``, whose rows all hold ``fan_in * N / M``):
      [`CondensedLinear`][sparseopt.export.CondensedLinear] or
      [`CondensedConv1x1`][sparseopt.export.CondensedConv1x1] (any float dtype) when at least
      ``min_sparsity`` sparse, by default the measured
      [`fan_in_min_sparsity_rule`][sparseopt.export.fan_in_min_sparsity_rule]; else dense.

    ``"auto"`` detects per layer: 2:4 when every group of 4 inputs holds exactly 2 active, else
    constant fan-in when every row holds the same count ``k`` with ``0 < k < fan_in``. Without
    ``masks`` the active positions are the nonzeros, so a trained active weight that is exactly 0
    breaks the count of its row: pass ``masks=opt.masks`` to use the optimizer's masks.

    The outputs equal the dense model's within rounding (the sums run in another order); 2:4
    runs in the weight's half precision. ``model`` itself is not changed.

    The report is attached as ``sparse_inference_report`` (an
    [`InferenceReport`][sparseopt.export.InferenceReport]); a warning says when no layer was
    converted. The CSR copy works with ``torch.jit.script`` (see ``docs/deploying.md``). Put it
    in ``eval()`` mode and call it under ``torch.inference_mode()``.

    Args:
        model (nn.Module): the trained model (masked weights exactly 0).
        min_sparsity (float | None): convert layers at least this sparse. Default: ``None``, the
            measured rules [`min_sparsity_rule`][sparseopt.export.min_sparsity_rule] (CSR) and
            [`fan_in_min_sparsity_rule`][sparseopt.export.fan_in_min_sparsity_rule] (condensed)
            for each layer's size and ``batch_size`` (with 0.005 of slack, for masks drawn at
            random).
        layout (str): the unstructured layout, ``"csr"``, or ``"bsr"`` (square blocks; only
            layers whose shape the block divides). Default: ``"csr"``.
        batch_size (int): the batch the model will serve, for the default rules. Default: 1.
        blocksize (int | None): the block of ``"bsr"``. Default: ``None``, the largest of 16, 8,
            4, 2 that divides the layer's weight.
        structure (str | None): ``None`` (unstructured only, the behaviour of earlier
            versions), ``"auto"`` (detect per layer), ``"fan_in"`` or ``"N:M"`` (use that
            structure where a layer's mask holds it). Default: ``None``.
        masks (Mapping | None): the active positions, a mapping from the model's parameters
            (``SparseOptimizer.masks``) or ``state_dict`` names to bool masks. Default:
            ``None``, the nonzeros of each weight.

    Returns:
        The converted copy, in the mode (train or eval) of ``model``.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module`` or an argument has the wrong type.
        ValueError: if ``min_sparsity`` is outside ``[0, 1]``, ``layout`` or ``structure`` is
            unknown, ``batch_size`` or ``blocksize`` is not positive, or a mask does not fit its
            weight (see [`save_sparse`][sparseopt.export.save_sparse]).

    Examples:
        >>> import torch
        >>> from sparseopt import to_sparse_inference
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
        ...                             torch.nn.Linear(64, 10))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.mul_(torch.rand(64, 64) < 0.02)
        >>> fast = to_sparse_inference(model, min_sparsity=0.9)
        >>> fast.sparse_inference_report.converted
        ['0']
        >>> x = torch.randn(3, 64)
        >>> torch.allclose(fast(x), model(x), atol=1e-5)
        True

        A constant fan-in layer (4 active inputs per output) is condensed:

        >>> from sparseopt.structure import random_structured
        >>> mask = random_structured((64, 64), "fan_in", torch.Generator().manual_seed(0), k=4)
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.randn(64, 64) * mask)
        >>> fast = to_sparse_inference(model, min_sparsity=0.9, structure="auto")
        >>> type(fast[0]).__name__, fast.sparse_inference_report[0]["structure"]
        ('CondensedLinear', 'fan_in')
        >>> torch.allclose(fast(x), model(x), atol=1e-5)
        True
    """
    import copy

    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected model to be an nn.Module, but got {type(model).__name__}")
    if min_sparsity is not None:
        if not _validate.is_real(min_sparsity):
            raise TypeError(
                "Expected min_sparsity to be a float or None, but got "
                f"{_validate.type_of(min_sparsity)}"
            )
        if not 0.0 <= min_sparsity <= 1.0:
            raise ValueError(f"Expected min_sparsity to be in [0, 1], but got {min_sparsity}")
        min_sparsity = float(min_sparsity)
    _check_layout(layout)
    for arg, value in (("batch_size", batch_size), ("blocksize", blocksize)):
        if value is None and arg == "blocksize":
            continue
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            # the type first: tests/test_export.py matches "to be an int, but got float"
            raise TypeError(
                f"Expected {arg} to be an int, but got {type(value).__name__} {value!r}"
            )
        if value < 1:
            raise ValueError(f"Expected {arg} to be positive, but got {value}")
    batch_size = int(batch_size)
    blocksize = None if blocksize is None else int(blocksize)
    wanted: Structure | str | None
    if structure == "auto":
        wanted = "auto"
    else:
        try:
            wanted = parse_structure(structure)
        except (TypeError, ValueError) as e:
            kind = type(e)
            raise kind(str(e).replace("to be None,", "to be None, 'auto',", 1)) from None
    chosen = _resolve_masks(model, masks, model.state_dict(keep_vars=True))
    out = copy.deepcopy(model)
    report = InferenceReport()
    replace: list[tuple[str, nn.Module]] = []
    for name, module in out.named_modules():
        if module is out and not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        kind = type(module).__name__
        weight = getattr(module, "weight", None)
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            if isinstance(weight, Tensor) and weight.ndim >= 2:
                report.append(
                    {
                        "name": name,
                        "type": kind,
                        "shape": tuple(weight.shape),
                        "sparsity": 1 - int(torch.count_nonzero(weight)) / weight.numel(),
                        "converted": None,
                        "structure": None,
                        "reason": "layer type not supported (stays dense)",
                    }
                )
            continue
        w = module.weight.detach()
        mask = chosen.get(f"{name}.weight" if name else "weight")
        active = (w != 0) if mask is None else mask.to(w.device)
        sparsity = 1 - int(torch.count_nonzero(active)) / w.numel()
        row = {
            "name": name,
            "type": kind,
            "shape": tuple(w.shape),
            "sparsity": sparsity,
            "converted": None,
            "structure": None,
            "reason": "",
        }
        report.append(row)
        if isinstance(module, nn.Conv2d) and _conv_unsupported(module):
            row["reason"] = f"{_conv_unsupported(module)}: only 1x1 convolutions run sparse"
            continue
        note = ""
        if wanted is not None:
            label, k, why = _layer_structure(active.reshape(w.shape[0], -1), wanted)
            row["structure"] = label
            if label is None:
                note = why + "; "
            else:
                new, reason = _convert_structured(
                    module, mask, label, k, sparsity, min_sparsity, batch_size
                )
                row["reason"] = reason
                if new is not None:
                    replace.append((name, new))
                    row["converted"] = (
                        "2:4" if isinstance(new, SemiStructuredLinear) else ("condensed")
                    )
                continue
        if w.dtype not in (torch.float32, torch.float64):
            row["reason"] = note + f"{w.dtype}: torch's CPU sparse kernels take float32/float64"
            continue
        if min_sparsity is None:  # half a percent of slack: a 95% mask may hold 94.97% zeros
            threshold = min_sparsity_rule(w.numel(), batch_size)
            converts = sparsity >= threshold - 0.005
        else:
            threshold = min_sparsity
            converts = sparsity >= threshold
        if not converts:
            row["reason"] = note + f"sparsity {sparsity:.3f} < {threshold:.3f}: dense is faster"
            continue
        shape2d = (w.shape[0], w.numel() // w.shape[0])
        block = 1
        if layout == "bsr":
            block = blocksize or _block_for(shape2d) or 0
            if not block or shape2d[0] % block or shape2d[1] % block:
                row["reason"] = note + f"no square block divides {shape2d}"
                continue
        cls = SparseLinear if isinstance(module, nn.Linear) else SparseConv1x1
        replace.append((name, cls(module, layout, block) if layout == "bsr" else cls(module)))
        row["converted"] = layout
        row["reason"] = note + f"sparsity {sparsity:.3f} reaches {threshold:.3f}"
    for name, new in replace:
        new.train(out.training)
        if name == "":
            out = new
            continue
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, new)
    out.sparse_inference_report = report
    if not replace:
        warnings.warn(
            "to_sparse_inference converted no layer (no Linear or 1x1 Conv2d was sparse enough); "
            "nothing was gained: see the copy's sparse_inference_report",
            UserWarning,
            stacklevel=2,
        )
    return out


def _convert_structured(
    module: nn.Module,
    mask: Tensor | None,
    label: str,
    k: int,
    sparsity: float,
    min_sparsity: float | None,
    batch_size: int,
) -> tuple[nn.Module | None, str]:
    """The structured module for one layer whose mask holds ``label`` (or ``None``), and why."""
    w = module.weight.detach()
    note = ""
    if label == "2:4":
        why = (
            semi_structured_unsupported(w)
            if isinstance(module, nn.Linear)
            else "semi-structured 2:4 runs nn.Linear only"
        )
        if not why:
            try:
                return SemiStructuredLinear(module), "2:4 semi-structured (sparse tensor cores)"
            except (RuntimeError, NotImplementedError, ValueError) as e:
                why = f"to_sparse_semi_structured failed: {e}"
        note = f"2:4 mask, but {why}; "
    if not w.is_floating_point():
        return None, note + f"{w.dtype}: the condensed layer takes float weights"
    if min_sparsity is None:
        threshold = fan_in_min_sparsity_rule(w.numel(), batch_size)
        converts = sparsity >= threshold - 0.005
    else:
        threshold = min_sparsity
        converts = sparsity >= threshold
    what = f"constant fan-in {k}"
    if not converts:
        return None, note + f"{what}: sparsity {sparsity:.3f} < {threshold:.3f}: dense is faster"
    if isinstance(module, nn.Linear):
        new: nn.Module = CondensedLinear(module, mask)
    else:
        new = CondensedConv1x1(module, mask)
    return new, note + f"{what}: sparsity {sparsity:.3f} reaches {threshold:.3f}"
