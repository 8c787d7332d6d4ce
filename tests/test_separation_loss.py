"""hen_fast.uhop.separation_loss: the fused torch and Triton paths against the torch.pdist
float64 reference, gradients, underflow, memory, bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from hen_fast import oracle
from hen_fast.backends import BackendUnavailableError
from hen_fast.profiling import peak_extra_bytes
from hen_fast.uhop import separation_loss
from hen_fast.uhop.loss import torch_row_stats

from helpers import randint, rel_err, strided

REDUCTIONS = ("average", "max")


def _features(gen, max_rows=60, max_dim=17, scale=None):
    rows, dim = randint(gen, 2, max_rows), randint(gen, 1, max_dim)
    scale = scale if scale is not None else 1.0 / math.sqrt(dim)
    return strided(scale * torch.randn(rows, dim, generator=gen, dtype=torch.float64), gen)


def _gradient_scale(features, t, reduction):
    """The scale of the loss's gradient before cancellation. With w the weights of the ordered
    pairs (softmax of their log-kernels; the closest pair alone for "max") and w_s = w + w^T,
    dL/dz_u = -2t sum_v w_s[u, v] (z_u - z_v), so each entry is at most
    2t sum_v w_s[u, v] (|z_u| + |z_v|): the gradient's error is measured against that, since the
    gradient itself can cancel to near zero."""
    z = features.detach().double()
    log_kernel = -t * torch.cdist(z, z) ** 2
    log_kernel.fill_diagonal_(-math.inf)
    if reduction == "max":
        weights = (log_kernel == log_kernel.max()).double()
        weights /= weights.sum()
    else:
        weights = log_kernel.flatten().softmax(0).view_as(log_kernel)
    both = weights + weights.T
    bound = 2 * t * (both.sum(1, keepdim=True) * z.abs() + both @ z.abs())
    return float(bound.max())


def _loss_and_grad(fn, features):
    leaf = features.detach().clone().requires_grad_()
    loss = fn(leaf)
    loss.backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_definition_on_three_points(reduction):
    points = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)  # squared gaps 1, 4, 9
    t = 0.5
    expected = (
        math.log((2 * math.exp(-t) + 2 * math.exp(-4 * t) + 2 * math.exp(-9 * t)) / 6)
        if reduction == "average"
        else -t
    )
    for fn in (separation_loss, oracle.naive_separation_loss):
        assert abs(float(fn(points, t, reduction)) - expected) < 1e-14


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_path_matches_pdist_in_float64(gen, reduction):
    for _ in range(5):
        features = _features(gen)
        t = float(torch.empty(()).uniform_(0.2, 4.0, generator=gen))
        block = randint(gen, 1, features.shape[0])
        got, got_grad = _loss_and_grad(
            lambda z, t=t, block=block: separation_loss(z, t, reduction, block=block), features
        )
        want, want_grad = _loss_and_grad(
            lambda z, t=t: oracle.naive_separation_loss(z, t, reduction), features
        )
        assert rel_err(got, want) < 1e-12
        assert rel_err(got_grad, want_grad) < 1e-10


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float32_far_under_1e_4(gen, reduction):
    features = _features(gen, max_rows=200, max_dim=40)
    got, got_grad = _loss_and_grad(
        lambda z: separation_loss(z, 2.0, reduction, block=64), features.float()
    )
    want, want_grad = _loss_and_grad(
        lambda z: oracle.naive_separation_loss(z, 2.0, reduction), features
    )
    assert got.dtype == torch.float32 and got_grad.dtype == torch.float32
    assert rel_err(got, want, floor=1.0) < 1e-5
    assert rel_err(got_grad, want_grad, scale=_gradient_scale(features, 2.0, reduction)) < 1e-5


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64(gen, reduction):
    features = torch.randn(7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda z: separation_loss(z, 1.5, reduction, block=4), (features,)
    )


def test_well_separated_features_do_not_underflow(gen):
    # Every exp(-t d^2) underflows in float64 (d^2 ~ 2e4, t = 2): only the running max saves it.
    features = 100.0 * torch.randn(40, 3, generator=gen, dtype=torch.float64)
    got, got_grad = _loss_and_grad(lambda z: separation_loss(z, 2.0, block=16), features)
    want, want_grad = _loss_and_grad(lambda z: oracle.naive_separation_loss(z, 2.0), features)
    assert torch.isfinite(got) and bool(torch.isfinite(got_grad).all())
    assert rel_err(got, want) < 1e-12
    assert rel_err(got_grad, want_grad) < 1e-8


def test_block_size_and_a_single_row_tile_give_the_same_result(gen):
    features = _features(gen, max_rows=30)
    features = torch.cat([features, features[:1] + 0.1])  # odd count: a last tile of one row
    results = [
        _loss_and_grad(lambda z, b=b: separation_loss(z, 2.0, block=b), features)
        for b in (1, 2, features.shape[0] - 1, 1024)
    ]
    for loss, grad in results[1:]:
        assert rel_err(loss, results[0][0]) < 1e-13
        assert rel_err(grad, results[0][1]) < 1e-12


def test_without_grad_only_the_loss_is_computed(gen, monkeypatch):
    from hen_fast.uhop import loss as loss_module

    asked = []

    def spy(*args, **kwargs):
        asked.append(kwargs["want_acc"])
        return torch_row_stats(*args, **kwargs)

    monkeypatch.setattr(loss_module, "torch_row_stats", spy)
    features = _features(gen)
    with torch.no_grad():
        loss = separation_loss(features.requires_grad_())
    assert not loss.requires_grad and asked == [False]
    assert rel_err(loss, oracle.naive_separation_loss(features.detach())) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_compute_in_float32(gen, dtype):
    features = _features(gen).to(dtype)
    loss, grad = _loss_and_grad(separation_loss, features)
    want = oracle.naive_separation_loss(features)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert rel_err(loss, want, floor=1.0) < 1e-5


def test_max_gradient_moves_only_the_closest_pair(gen):
    features = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    features[7] = features[2] + 1e-3  # the closest pair by far
    _, grad = _loss_and_grad(lambda z: separation_loss(z, reduction="max"), features)
    moved = grad.abs().sum(dim=1) > 0
    assert moved.nonzero().flatten().tolist() == [2, 7]


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_triton_interpreter_matches_the_reference(gen, reduction):
    pytest.importorskip("triton")
    features = _features(gen, max_rows=45, max_dim=37)  # crosses several 16-wide tiles
    got, got_grad = _loss_and_grad(
        lambda z: separation_loss(z, 2.0, reduction, backend="triton"), features.float()
    )
    want, want_grad = _loss_and_grad(
        lambda z: oracle.naive_separation_loss(z, 2.0, reduction), features
    )
    assert rel_err(got, want, floor=1.0) < 1e-5
    assert rel_err(got_grad, want_grad, scale=_gradient_scale(features, 2.0, reduction)) < 1e-5


def test_triton_statistics_fill_every_poisoned_output(gen):
    pytest.importorskip("triton")
    from hen_fast.backends.triton.separation_loss import triton_row_stats

    z = _features(gen, max_rows=40, max_dim=40).float()
    got = triton_row_stats(z, 1.5, want_sum=True, want_acc=True)
    want = torch_row_stats(z.double(), 1.5, want_sum=True, want_acc=True, block=7)
    assert bool((got[1] == want[1]).all())  # argmax: random data has no ties
    for ours, theirs in zip((got[0], got[2], got[3]), (want[0], want[2], want[3])):
        assert rel_err(ours, theirs) < 1e-5  # NaN (an entry never written) is infinite error


def test_triton_refuses_float64_and_cpu_without_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    with pytest.raises(BackendUnavailableError, match="float64"):
        separation_loss(torch.randn(4, 3, dtype=torch.float64), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError):
            separation_loss(torch.randn(4, 3), backend="triton")


COMPILE_SCRIPT = """
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hen_fast.backends.triton.separation_loss import _pair_stats_kernel as kernel

types = {"arg_ptr": "*i64", "t": "fp32"}
signature = {
    p.name: "constexpr" if p.is_constexpr
    else types.get(p.name, "*fp32" if p.name.endswith("_ptr") else "i32")
    for p in kernel.params
}
for arch, want_sum, want_acc in ((90, True, True), (80, True, True), (90, False, False)):
    constants = dict(WANT_SUM=want_sum, WANT_ACC=want_acc, BLOCK_I=64, BLOCK_J=64,
                     BLOCK_D=32, BLOCK_DV=256, PRECISION="ieee")
    constexprs = {(kernel.arg_names.index(k),): v for k, v in constants.items()}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    done = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})
    print(json.dumps(dict(arch=arch, cubin=bool(done.asm.get("cubin")),
                          shared=done.metadata.shared)))
"""


def test_triton_kernel_compiles_for_hopper_and_ampere():
    """The interpreter misses what only the compiler checks; compile the GPU launch forms (the
    loss and gradient on both, the loss-free statistics for the max loss) to sm_90 and sm_80
    cubins."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(results) == 3 and all(r["cubin"] for r in results)
    assert max(r["shared"] for r in results) <= 163 * 1024  # fits an A100 (and an H100)


def test_extra_memory_is_far_below_the_pair_count():
    # 3000 rows: the M x M kernel would be 36 MB in float32, pdist's half of it 36 MB in float64.
    setup = """
import torch
from hen_fast.uhop import separation_loss
z = torch.randn(3000, 8).requires_grad_()
"""
    (extra,) = peak_extra_bytes(setup, ["separation_loss(z, block=500).backward()"])
    assert extra < 10e6, extra


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(t=0.0), ValueError, "t must be"),
        (dict(t=-1.0), ValueError, "t must be"),
        (dict(t=float("nan")), ValueError, "t must be"),
        (dict(t="2"), TypeError, "t must be"),
        (dict(reduction="min"), ValueError, "reduction"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(block=0), ValueError, "block"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        separation_loss(torch.randn(5, 3), **kwargs)


@pytest.mark.parametrize(
    "features, error, match",
    [
        (torch.randn(1, 3), ValueError, "at least 2 rows"),
        (torch.randn(5), ValueError, r"shape \(M, D\)"),
        (torch.randn(5, 0), ValueError, "at least one column"),
        (torch.ones(5, 3, dtype=torch.long), TypeError, "floating-point"),
        (torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), ValueError, "NaN"),
        ([[0.0], [1.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_features(features, error, match):
    with pytest.raises(error, match=match):
        separation_loss(features)
