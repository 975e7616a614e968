"""The compact sparse checkpoint: ``save_sparse`` and ``load_sparse``, which store only the active
weights of the sparse tensors and check the whole file before the model changes.

The file is [safetensors](https://github.com/huggingface/safetensors) when that package is
installed (the ``export`` extra): a format that cannot hold code, read without unpickling
anything. Without it, the same tensors go through ``torch.save`` and are read back with
``torch.load(weights_only=True)``, which unpickles only tensors and plain containers. Both files
carry a header (format version, per-tensor encoding, shape, dtype, CRC-32 of each stored tensor)
that ``load_sparse`` checks in full before it changes the model. Positions are a bitmask or
byte-sized gaps, whichever is smaller for that tensor.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import uuid
import warnings
import zlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .. import _validate
from ._common import dtype_name, resolve_masks

__all__ = ["load_sparse", "save_sparse"]

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


def _path(path: Any) -> str:
    """``path`` as a string, or a ``TypeError`` that names the argument."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"Expected path to be a str or os.PathLike, but got {_validate.type_of(path)}"
        )
    return os.fspath(path)


def _check_writable(path: str) -> None:
    """An ``OSError`` naming ``path`` (and the folder that is missing) unless a file can be
    written there: its folder exists and ``path`` is not a folder itself."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"Expected path to be a file to write, but {path!r} is a folder")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(folder):
        return
    first, parent = folder, os.path.dirname(folder)
    while parent != first and not os.path.isdir(parent):  # the first part that is no folder
        first, parent = parent, os.path.dirname(parent)
    kind = NotADirectoryError if os.path.exists(first) else FileNotFoundError
    what = "is a file, not a folder" if os.path.exists(first) else "does not exist"
    raise kind(
        f"Expected the folder of path {path!r} to exist, but {first!r} {what} (create the "
        f"folder first, e.g. os.makedirs({folder!r}))"
    )


def _write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` all or nothing: into a temporary file beside it, then renamed
    over it. On an error the temporary file is removed and the error names ``path``."""
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{base}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        why = e.strerror or str(e)
        raise (
            type(e)(e.errno, f"cannot write {path!r}: {why}")
            if e.errno
            else type(e)(f"cannot write {path!r}: {why}")
        ) from e
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
        path (str | os.PathLike): the file to write, in a folder that exists (replaced if it
            exists, all at once: a save that fails leaves no file behind and the old one as it
            was).
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
        FileNotFoundError: if the folder of ``path`` does not exist (the message names
            ``path`` and the first missing folder); ``NotADirectoryError`` if a part of it is a
            file, ``IsADirectoryError`` if ``path`` is a folder; another ``OSError`` naming
            ``path`` if writing fails.

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
    _check_writable(path)
    state = model.state_dict(keep_vars=True)
    params = {id(p) for p in model.parameters()}
    chosen = resolve_masks(masks, state)
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
            "dtype": dtype_name(t.dtype),
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
        from safetensors.torch import save

        data, fmt = save(tensors, metadata=header), "safetensors"
    else:
        buffer = io.BytesIO()
        torch.save({"header": header, "tensors": tensors}, buffer)
        data, fmt = buffer.getvalue(), "torch"
    _write(path, data)
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
        if entry.get("dtype") != dtype_name(t.dtype):
            problems.append(
                f"{name}: dtype {entry.get('dtype')} in the file, {dtype_name(t.dtype)} in "
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
