"""What every Triton retrieval kernel shares: the score tile, launch geometry, interpreter rules.

Imported only when the Triton backend is first used (it imports triton).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ... import codes
from ..norms import cached_sq_norms  # noqa: F401  (re-exported for the launcher)

# The similarity and separation codes (hen_fast/codes.py is their one definition): ints for the
# launchers, and the same values as constexprs, which kernels may read as globals.
SIMILARITY = codes.SIMILARITY_CODES
SEPARATION = codes.SEPARATION_CODES
SIM_DOT: tl.constexpr = tl.constexpr(SIMILARITY["dot"])
SIM_L2: tl.constexpr = tl.constexpr(SIMILARITY["l2"])
SIM_MANHATTAN: tl.constexpr = tl.constexpr(SIMILARITY["manhattan"])
SEP_SOFTMAX: tl.constexpr = tl.constexpr(SEPARATION["softmax"])
SEP_POLYNOMIAL: tl.constexpr = tl.constexpr(SEPARATION["polynomial"])
SEP_ENTMAX: tl.constexpr = tl.constexpr(SEPARATION["entmax"])
# The largest scale (beta) a kernel takes. Past float32's range beta would reach a kernel as inf,
# and inf * 0 (the row maximum's own difference) is NaN; from about 3e38 on Triton also types the
# argument float64 (seen in its interpreter). 1e38 gives the same limit as any larger beta: every
# difference from the row maximum but 0 (float32 differences of scores are >= ~1e-38 * |score|)
# goes to -inf.
KERNEL_SCALE_MAX = 1e38


def kernel_scale(value: float) -> float:
    """A beta-like scale as a kernel's float32 argument (see KERNEL_SCALE_MAX)."""
    return min(float(value), KERNEL_SCALE_MAX)


# The same separation codes as plain ints, for the launchers (sparsemax is entmax with alpha 2).
SOFTMAX, POLYNOMIAL, ENTMAX = SEPARATION["softmax"], SEPARATION["polynomial"], SEPARATION["entmax"]
# Rows of the bank each split covers are a multiple of this (every BLOCK_M divides it), so split
# boundaries do not depend on the tile size an autotuner picks.
SPLIT_ALIGN = 256
FLOAT32_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # a constexpr: kernels may read it


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_splits(num_row_blocks: int, num_memories: int, device: torch.device) -> int:
    """Splits of the bank so that (row blocks x splits) fills the GPU about four waves deep, as
    flash-decoding does for few queries; never more splits than SPLIT_ALIGN-row pieces."""
    if device.type != "cuda":
        programs = 4  # the interpreter: a few splits, so the combine step is always exercised
    else:
        programs = 4 * _multiprocessors(device.index or 0)
    wanted = max(1, -(-programs // num_row_blocks))
    return max(1, min(wanted, -(-num_memories // SPLIT_ALIGN)))


def split_size(num_memories: int, splits: int) -> int:
    rows = -(-num_memories // splits)
    return -(-rows // SPLIT_ALIGN) * SPLIT_ALIGN


def dot_settings(*tensors: torch.Tensor) -> tuple[bool, str]:
    """(cast operands to float32 before tl.dot, input precision). float32 is computed exactly
    ("ieee", not tf32); the interpreter cannot multiply bfloat16, so it always works in float32;
    mixed dtypes meet in float32."""
    dtypes = {t.dtype for t in tensors}
    to_f32 = interpreting() or len(dtypes) > 1 or torch.float32 in dtypes
    return to_f32, "ieee"


# What the autotuner chooses on a GPU; the interpreter runs the first config untuned.
TUNED = [
    triton.Config({"BLOCK_M": block_m}, num_warps=warps, num_stages=stages)
    for block_m in (64, 128)
    for warps in (4, 8)
    for stages in (2, 3)
]


def tuned(kernel, config: dict, key: tuple[str, ...] = ("dim",)):
    """(kernel, launch options): autotuned over TUNED on a GPU, where BLOCK_M, num_warps and
    num_stages are its to choose; under TRITON_INTERPRET=1 the kernel itself with UNTUNED.
    Only for kernels whose outputs are a pure function of their inputs (no atomics)."""
    if interpreting():
        return kernel, untuned(config)
    return _autotuned(kernel, key), config


UNTUNED = {"BLOCK_M": 32, "num_warps": 4, "num_stages": 2}


def untuned(config: dict) -> dict:
    """Launch options for a kernel the autotuner does not touch."""
    if interpreting():
        return {**UNTUNED, **config}
    return {"BLOCK_M": 64, "num_warps": 4, "num_stages": 2, **config}


@functools.cache
def _autotuned(kernel, key):
    return triton.autotune(TUNED, key=list(key))(kernel)


def strides(tensor: torch.Tensor) -> tuple[int, int]:
    return tensor.stride(0), tensor.stride(1)


@triton.jit
def block_and_split(active_ptr, num_rows, num_memories, rows_per_split, BLOCK_B: tl.constexpr):
    """This program's query rows (and their mask) and its bank range [start, stop). Converged
    queries are skipped: a block whose rows are all inactive gets an empty range."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < num_rows
    active = tl.load(active_ptr + rows, mask=row_mask, other=0)
    start = tl.program_id(1) * rows_per_split
    stop = tl.minimum(start + rows_per_split, num_memories)
    stop = tl.where(tl.max(active, axis=0) > 0, stop, start)
    return rows, row_mask, start, stop


@triton.jit
def tile_offsets(rows, cols, stride_row, stride_col):
    """Element offsets of a (rows, cols) tile, in int64. Triton hands a stride below 2^31 to the
    kernel as int32, and row x stride passes 2^31 in the banks this package is for (1e7 x 256),
    as it does for rows 2^30 elements apart; so the indices are widened before the multiply (one
    vector per axis, then one int64 add per element, which the address needs anyway)."""
    return rows.to(tl.int64)[:, None] * stride_row + cols.to(tl.int64)[None, :] * stride_col


@triton.jit
def load_tile(ptr, rows, cols, stride_row, stride_col, row_mask, col_mask):
    """The (rows, cols) tile at ``ptr`` in float32, 0 where a row or column is masked."""
    offsets = tile_offsets(rows, cols, stride_row, stride_col)
    return tl.load(ptr + offsets, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(
        tl.float32)


@triton.jit
def score_tile(
    x_ptr, k_ptr, norms_ptr, rows, mems, row_mask, mem_mask, stride_xb, stride_xd, stride_km,
    stride_kd, dim, SIM: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    """The similarity of a (BLOCK_B, BLOCK_M) tile in float32, not yet multiplied by beta;
    memories past the bank are -inf.

    Callers scale differences from a row's maximum, ``beta * (s - max)``, never ``beta * s``
    itself: that stays finite and accurate where ``beta * s`` would overflow float32 or cancel
    (beta up to 1e30). dot and l2 go through tl.dot over BLOCK_D slices of d (l2 as
    2 x.k - ||k||^2 with the bank's float32 squared norms); manhattan has no matrix-unit form and
    sums |x - k| in registers.
    """
    acc = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
    x_rows = rows.to(tl.int64)[:, None] * stride_xb
    k_rows = mems.to(tl.int64)[:, None] * stride_km
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < dim
        wide_cols = cols.to(tl.int64)[None, :]
        x = tl.load(
            x_ptr + x_rows + wide_cols * stride_xd,
            mask=row_mask[:, None] & col_mask[None, :], other=0.0,
        )
        k = tl.load(
            k_ptr + k_rows + wide_cols * stride_kd,
            mask=mem_mask[:, None] & col_mask[None, :], other=0.0,
        )
        if SIM == SIM_MANHATTAN:
            diff = x.to(tl.float32)[:, None, :] - k.to(tl.float32)[None, :, :]
            acc += tl.sum(tl.abs(diff), axis=2)
        else:
            if DOT_F32:
                x = x.to(tl.float32)
                k = k.to(tl.float32)
            acc = tl.dot(x, tl.trans(k), acc, input_precision=PRECISION)
    return finish_scores(acc, norms_ptr, mems, mem_mask, SIM)


@triton.jit
def memory_tile(
    m0, stop, x_ptr, k_ptr, norms_ptr, rows, row_mask, stride_xb, stride_xd, stride_km, stride_kd,
    dim, SIM: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    """The memories ``m0 .. m0 + BLOCK_M`` of a pass that ends at ``stop``: their indices, which
    of them exist, and their similarity tile (:func:`score_tile`)."""
    mems = m0 + tl.arange(0, BLOCK_M)
    mem_mask = mems < stop
    s = score_tile(x_ptr, k_ptr, norms_ptr, rows, mems, row_mask, mem_mask, stride_xb, stride_xd,
                   stride_km, stride_kd, dim, SIM, BLOCK_B, BLOCK_M, BLOCK_D, DOT_F32, PRECISION)
    return mems, mem_mask, s


@triton.jit
def finish_scores(acc, norms_ptr, mems, mem_mask, SIM: tl.constexpr):
    """The similarity from the raw tile (x.k for dot and l2, sum |x - k| for manhattan),
    clamped to float32's finite range as in every backend: similarities that overflow tie at the
    largest float instead of making inf - inf a NaN. The comparisons keep a NaN input's NaN."""
    if SIM == SIM_L2:
        norms = tl.load(norms_ptr + mems, mask=mem_mask, other=0.0)
        acc = 2.0 * acc - norms[None, :]
    if SIM == SIM_MANHATTAN:
        acc = -acc
    acc = tl.where(acc > FLOAT32_MAX, FLOAT32_MAX, acc)
    acc = tl.where(acc < -FLOAT32_MAX, -FLOAT32_MAX, acc)
    return tl.where(mem_mask[None, :], acc, float("-inf"))


@triton.jit
def safe_shift(row_max):
    """The row maximum to subtract before exponentiating, 0 for a row with no finite score yet:
    exp(-inf - 0) is 0 where exp(-inf - -inf) would be NaN."""
    return tl.where(row_max > float("-inf"), row_max, 0.0)


@triton.jit
def power(base, exponent, EXPONENT_KIND: tl.constexpr):
    """base ** exponent for base >= 0 (0 ** exponent = 0): exact for 1 and 2."""
    if EXPONENT_KIND == 1:
        return base
    elif EXPONENT_KIND == 2:
        return base * base
    else:
        positive = base > 0
        return tl.where(positive, tl.exp2(exponent * tl.log2(tl.where(positive, base, 1.0))), 0.0)


def exponent_kind(exponent: float) -> int:
    return 1 if exponent == 1.0 else 2 if exponent == 2.0 else 0
