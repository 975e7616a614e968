"""The measured rule: from which sparsity a layer trains faster on the sparse kernels than dense."""

from __future__ import annotations

from .._rules import Rule, lookup

__all__ = ["training_min_sparsity_rule"]

# numel at most / (rows at least, sparsity): the measurement in the docstring below
_TRAINING_RULE: Rule = (
    ((1 << 16) - 1, ((1, 1.0),)),
    (1 << 16, ((64, 0.8), (1, 1.0))),
    (1 << 18, ((64, 0.8), (16, 0.9), (1, 1.0))),
    ((1 << 22) - 1, ((16, 0.8), (1, 1.0))),
    ((1 << 24) - 1, ((16, 0.8), (1, 0.98))),
    (None, ((1, 0.8),)),
)


def training_min_sparsity_rule(numel: int, batch_size: int) -> float:
    """The sparsity from which a layer's forward plus backward beat dense on CPU in our
    measurement.

    Measured with ``benchmarks/sparse_training.py`` (torch 2.13, one ``nn.Linear`` forward plus
    input and weight gradients, square layers of 256 to 4096 and 4096x16384, at 80, 90, 95 and
    98% sparsity and 1, 16, 64 and 256 rows; the tables are in ``docs/faster-training.md``).
    Per-call costs make small layers and few rows lose: at one row only layers of 2**24 weights
    and more won from 80% (1.2-2.8x), 2048x2048 won only at 98%, and smaller ones lost at every
    sparsity (0.3-1.1x). From 16 rows, layers above 2**18 weights won from 80% (1.2-2.6x),
    512x512 from 90% (1.4x; 0.9x at 80%) and 256x256 never (0.7-0.9x); from 64 rows every layer
    won from 80% (1.3-2.9x). Below 80% sparsity and below 256x256 weights was not measured (a
    64x64 layer lost 3x at 8 rows: the per-call cost): the layer stays dense.

    Args:
        numel (int): the layer's weight count.
        batch_size (int): rows of the GEMM (the batch of a Linear, times the sequence length
            for a sequence; batch times pixels for a 1x1 convolution).

    Returns:
        The minimum sparsity in ``[0, 1]`` at which the layer runs sparse (1.0: never).

    Raises:
        TypeError: if ``numel`` or ``batch_size`` is not an int.
        ValueError: if ``numel`` is negative or ``batch_size`` is not positive.

    Examples:
        >>> training_min_sparsity_rule(4096 * 4096, 1), training_min_sparsity_rule(1024 * 1024, 1)
        (0.8, 1.0)
        >>> training_min_sparsity_rule(512 * 512, 16), training_min_sparsity_rule(256 * 256, 64)
        (0.9, 0.8)
        >>> training_min_sparsity_rule(128 * 128, 256)
        1.0
    """
    return lookup(numel, batch_size, _TRAINING_RULE)
