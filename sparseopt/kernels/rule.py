"""The measured rule: from which sparsity a layer trains faster on the sparse kernels than dense."""

from __future__ import annotations

from .. import _validate

__all__ = ["training_min_sparsity_rule"]


def training_min_sparsity_rule(numel: int, batch_size: int) -> float:
    """The sparsity from which a layer's forward plus backward beat dense on CPU in our
    measurement (``benchmarks/sparse_training.py``; the tables are in ``docs/faster-training.md``).

    PLACEHOLDER: replaced by the measured grid.

    Args:
        numel (int): the layer's weight count.
        batch_size (int): rows of the GEMM (the batch of a Linear, batch x pixels of a 1x1
            convolution).

    Returns:
        The minimum sparsity in ``[0, 1]`` at which the layer runs sparse (1.0: never).

    Raises:
        TypeError: if ``numel`` or ``batch_size`` is not an int.
        ValueError: if ``numel`` is negative or ``batch_size`` is not positive.

    Examples:
        >>> training_min_sparsity_rule(4096 * 4096, 64)
        0.8
    """
    numel = _validate.integer("numel", numel, 0)
    batch_size = _validate.integer("batch_size", batch_size, 1)
    if numel <= 1 << 16:
        return 1.0
    if numel <= 1 << 18:
        return 0.9
    return 0.8
