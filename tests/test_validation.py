"""Every bad input raises the promised error, naming the argument."""

import math

import pytest
import torch

from hen_fast import retrieve

Q = torch.randn(4, 6)
K = torch.randn(10, 6)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        # types and dtypes
        (dict(queries=Q.numpy()), TypeError, "queries must be a torch.Tensor"),
        (dict(queries=Q.to(torch.int64)), TypeError, "queries must be a floating-point"),
        (dict(memories=K.to(torch.complex64)), TypeError, "memories must be a floating-point"),
        (dict(values=torch.ones(10, 2, dtype=torch.bool)), TypeError, "values must be a floating"),
        (dict(queries=Q[None]), ValueError, r"queries must have shape \(d,\) or \(N, d\)"),
        (dict(memories=K[0]), ValueError, r"memories must have shape \(N, d\)"),
        # sizes
        (dict(queries=torch.randn(0, 6)), ValueError, "at least one query"),
        (
            dict(queries=torch.randn(3, 0), memories=torch.randn(10, 0)),
            ValueError,
            "at least one feature",
        ),
        (dict(memories=torch.randn(0, 6)), ValueError, "memories is empty"),
        (
            dict(memories=torch.randn(10, 5)),
            ValueError,
            "memories must have the queries' dimension d=6",
        ),
        (dict(values=torch.randn(9, 3)), ValueError, r"values must have one row per memory \(10\)"),
        (dict(values=torch.randn(10, 0)), ValueError, "values must have at least one column"),
        # devices
        (
            dict(memories=torch.randn(10, 6, device="meta")),
            ValueError,
            "one device.*memories on meta",
        ),
        (
            dict(clamp_mask=torch.ones(6, dtype=torch.bool, device="meta")),
            ValueError,
            "one device.*clamp_mask on meta",
        ),
        # non-finite inputs
        (
            dict(queries=Q.clone().index_fill_(0, torch.tensor([2]), math.nan)),
            ValueError,
            "queries contains NaN or Inf",
        ),
        (
            dict(memories=K.clone().index_fill_(1, torch.tensor([0]), math.inf)),
            ValueError,
            "memories contains NaN or Inf",
        ),
        (dict(values=torch.full((10, 2), -math.inf)), ValueError, "values contains NaN or Inf"),
        # beta
        (dict(beta=0.0), ValueError, "beta must be > 0"),
        (dict(beta=-1), ValueError, "beta must be > 0"),
        (dict(beta=math.inf), ValueError, "beta must be finite"),
        (dict(beta=math.nan), ValueError, "beta must be finite"),
        (dict(beta="1"), TypeError, "beta must be a real number"),
        (dict(beta=True), TypeError, "beta must be a real number"),
        # names
        (dict(similarity="cosine"), ValueError, "similarity must be one of"),
        (dict(separation="gelu"), ValueError, "separation must be one of"),
        # alpha, degree
        (
            dict(separation="entmax", alpha=1.0),
            ValueError,
            r"alpha must lie in the open interval \(1, 2\)",
        ),
        (dict(separation="entmax", alpha=2.0), ValueError, "alpha must lie"),
        (dict(separation="entmax", alpha=0.3), ValueError, "alpha must lie"),
        (dict(separation="entmax", alpha=math.nan), ValueError, "alpha must be finite"),
        (dict(separation="polynomial", degree=0.5), ValueError, "degree must be >= 1"),
        (dict(separation="polynomial", degree=0), ValueError, "degree must be >= 1"),
        (
            dict(separation="polynomial", similarity="l2"),
            ValueError,
            "'polynomial' is defined for similarity 'dot'",
        ),
        # steps, tol
        (dict(steps=0), ValueError, "steps must be >= 1"),
        (dict(steps=2.0), TypeError, "steps must be an int"),
        (dict(steps=True), TypeError, "steps must be an int"),
        (dict(steps=2, values=torch.randn(10, 3)), ValueError, "steps > 1 .* dv=3"),
        (dict(steps=2, tol=-1e-3), ValueError, "tol must be >= 0"),
        # clamp_mask
        (dict(clamp_mask=torch.ones(6)), TypeError, "clamp_mask must be a bool tensor"),
        (dict(clamp_mask=[True] * 6), TypeError, "clamp_mask must be a torch.Tensor"),
        (dict(clamp_mask=torch.ones(5, dtype=torch.bool)), ValueError, "does not broadcast"),
        (dict(clamp_mask=torch.ones(2, 4, 6, dtype=torch.bool)), ValueError, "does not broadcast"),
        (
            dict(clamp_mask=torch.ones(6, dtype=torch.bool), values=torch.randn(10, 2)),
            ValueError,
            "clamp_mask .* dv=2",
        ),
        # flags, backends
        (dict(return_info=1), TypeError, "return_info must be a bool"),
        (dict(check_finite=None), TypeError, "check_finite must be a bool"),
        (dict(backend="fortran"), ValueError, "backend must be 'auto' or one of"),
        (dict(backend=3), TypeError, "backend must be a string"),
    ],
)
def test_bad_input_raises(kwargs, error, match):
    args = dict(queries=Q, memories=K)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        retrieve(args.pop("queries"), args.pop("memories"), args.pop("values", None), **args)


def test_alpha_and_degree_are_only_checked_where_used():
    retrieve(Q, K, separation="softmax", alpha=7.0, degree=-1)


def test_check_finite_false_skips_the_check():
    bad = K.clone()
    bad[3, 2] = math.nan
    out = retrieve(Q, bad, check_finite=False)
    assert out.shape == Q.shape  # the NaN propagates; nothing raised


def test_zero_dim_tensor_beta_is_accepted():
    assert torch.equal(retrieve(Q, K, beta=torch.tensor(2.0)), retrieve(Q, K, beta=2.0))
