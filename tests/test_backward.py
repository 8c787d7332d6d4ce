"""Backward passes of the fused backends (cpu: hen_fast::retrieve_step_backward; triton: the
kernels of backends/triton/backward.py) against autograd through the float64 reference.

The kernels compute in float32, so a float64 gradcheck does not apply to them; instead each
gradient must be about as accurate as the float32 reference's own autograd gradient (both against
float64): at most twice its error plus a small floor, and far under 1e-4. Every buffer the Python
launchers allocate with torch.empty is poisoned with NaN, and NaN anywhere fails the comparison.
"""

import pytest
import torch

import hen_fast
from hen_fast.backends import Request, cpu, select_backend

from helpers import COMBINATIONS, combo_id, combo_kwargs, random_problem, rel_err

HAS_CPU_KERNEL = cpu.load_extension()
HAS_TRITON = hen_fast.backends.triton.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cpu_kernel = pytest.mark.skipif(not HAS_CPU_KERNEL, reason="the C++ extension is not built")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton cannot run here")


pytestmark = pytest.mark.usefixtures("poisoned_buffers")


def _gradients(backend, queries, memories, values, upstream, *, dtype=None, device="cpu", **kw):
    """(out, grads of sum(out * upstream) for queries, memories, values); leaves are the given
    tensors (their strides kept) or copies in ``dtype``. ``backend`` is a name for
    hen_fast.retrieve or a backend's own retrieve function (for options retrieve does not have)."""
    leaves = []
    for tensor in (queries, memories, values):
        if tensor is None:
            leaves.append(None)
            continue
        leaf = tensor.detach()
        leaf = leaf.to(dtype) if dtype is not None else leaf
        leaves.append(leaf.to(device).requires_grad_())
    if callable(backend):
        out, _ = backend(*leaves, **kw)
    else:
        out = hen_fast.retrieve(*leaves, backend=backend, **kw)
    loss = (out * upstream.to(out.dtype).to(device)).sum()
    wanted = [t for t in leaves if t is not None]
    return out, torch.autograd.grad(loss, wanted)


def _gradient_floors(queries, memories, values, upstream, floor, *, beta=1.0, **kw):
    """The scale of each gradient's terms before they cancel, at least ``floor``: a gradient
    that cancels to near zero (a support of one memory, whose weight cannot move) is measured
    against the size of what was summed, as float32 rounds it. For the values that is the
    upstream gradient (weights are at most 1); for queries and keys, beta x upstream x values x
    the size of a score's derivative (|k| or |x| for dot, 2 |x - k| for l2, 1 for manhattan)."""
    big = lambda t: float(t.detach().abs().max())  # noqa: E731
    values = memories if values is None else values
    similarity = kw.get("similarity", "dot")
    slope = {"dot": max(big(queries), big(memories)), "l2": 2 * (big(queries) + big(memories))}
    weights_scale = beta * big(upstream) * big(values) * slope.get(similarity, 1.0)
    return {
        "queries": max(floor, weights_scale),
        "memories": max(floor, weights_scale, big(upstream)),
        "values": max(floor, big(upstream)),
    }


def check_gradients(backend, queries, memories, values, *, gen, device="cpu", floor=1e-3, **kw):
    """The accuracy rule above, for every gradient, relative to the largest exact gradient (at
    least the scale of its terms, see _gradient_floors, and ``floor``: a gradient that is 0 in
    float64 is rounding noise in float32, for the reference as for the kernels); returns the
    errors."""
    values_dim = (memories if values is None else values).shape[1]
    upstream = torch.randn(queries.shape[0], values_dim, generator=gen, dtype=torch.float64)
    _, exact = _gradients("torch", queries, memories, values, upstream, dtype=torch.float64, **kw)
    _, ours32 = _gradients("torch", queries, memories, values, upstream, dtype=torch.float32, **kw)
    out, fused = _gradients(backend, queries, memories, values, upstream, device=device, **kw)
    assert out.dtype == queries.dtype
    errors = []
    floors = _gradient_floors(queries, memories, values, upstream, floor, **kw)
    for name, got, ref, want in zip(("queries", "memories", "values"), fused, ours32, exact):
        assert got.dtype == queries.dtype and got.shape == want.shape, name
        floor = floors[name]
        error, ref_error = rel_err(got.cpu(), want, floor), rel_err(ref, want, floor)
        steps = kw.get("steps", 1)
        # 2x the float32 reference's own error, plus a floor: the reference's error is itself a
        # random draw that can be tiny, and the kernels sum in a different order (measured: up
        # to ~6e-6 over seeds for one step).
        bound = 2 * ref_error + 1e-5 if steps == 1 else max(1e-4, 2 * ref_error)
        if kw.get("separation") == "entmax" and kw.get("alpha", 1.5) > 1.5:
            # The slope p^(2 - alpha) = [x - tau]_+^(q - 1) has q - 1 < 1: its derivative is
            # infinite at the threshold, so memories just above it amplify the last bits of
            # their scores and of the float32 threshold the forward hands over (the reference
            # keeps it in float64): measured up to ~1.2e-4 on rare draws. Known; see README.
            bound = max(3e-4, 2 * ref_error)
        # Some draws are ill-conditioned (a memory right at the threshold): there the float32
        # reference itself is off by ~1e-4, and the kernels are held to 2x that, never beyond 1e-3.
        assert error <= bound and error < 1e-3, (name, error, ref_error)
        errors.append(error)
    return errors


@needs_cpu_kernel
@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_cpu_gradients_match_reference(gen, combo):
    """Odd sizes, strided inputs, many query groups and bank splits."""
    queries, memories, values = random_problem(
        gen, dtype=torch.float32, max_queries=150, max_memories=9000
    )
    check_gradients("cpu", queries, memories, values, gen=gen, **combo_kwargs(combo), degree=3)


@needs_triton
@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_triton_gradients_match_reference(gen, combo):
    queries, memories, values = random_problem(
        gen, dtype=torch.float32, max_queries=20, max_memories=200
    )
    check_gradients(
        "triton", queries, memories, values, gen=gen, device=DEVICE, **combo_kwargs(combo),
        degree=3,
    )  # fmt: skip


BACKENDS = [
    pytest.param("cpu", marks=needs_cpu_kernel),
    pytest.param("triton", marks=needs_triton),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("separation", ["softmax", "sparsemax", "entmax", "polynomial"])
def test_gradients_through_steps_tol_and_clamp(gen, backend, separation):
    """Auto-association (values None: keys and values are one leaf), several steps, early stop,
    clamped components."""
    queries, memories, _ = random_problem(gen, dtype=torch.float32, same_dims=True, max_memories=60)
    mask = torch.rand(queries.shape[1], generator=gen) < 0.3
    kwargs = dict(beta=0.5, separation=separation, alpha=1.3, degree=3, steps=3, tol=1e-3)
    device = DEVICE if backend == "triton" else "cpu"
    check_gradients(
        backend, queries, memories, None, gen=gen, device=device, clamp_mask=mask.to(device),
        **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("separation, alpha", [("sparsemax", 2), ("entmax", 1.5), ("entmax", 1.3)])
def test_gradients_of_wide_supports(gen, backend, separation, alpha):
    """Supports wider than the forward's candidate buffer: the threshold of the Newton fallback
    is the one the backward sees."""
    queries, memories, values = random_problem(gen, dtype=torch.float32, max_memories=300)
    if backend == "cpu":
        fused, device = cpu.retrieve, "cpu"
    else:
        from hen_fast.backends.triton.retrieve import retrieve as fused

        device = DEVICE
    kwargs = dict(beta=0.05, separation=separation, alpha=alpha)
    _, info = hen_fast.retrieve(queries, memories, values, return_info=True, **kwargs)
    assert int(info.support.max()) > 2
    with_small_buffer = lambda *args, **kw: fused(*args, capacity=2, **kw)  # noqa: E731
    check_gradients(with_small_buffer, queries, memories, values, gen=gen, device=device, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_upstream_gradient_and_one_leaf(gen, backend):
    """out.sum() hands the backward a stride-0 gradient; only the queries need one."""
    device = DEVICE if backend == "triton" else "cpu"
    queries, memories, values = random_problem(gen, dtype=torch.float32, max_memories=100)
    for separation in ("softmax", "entmax"):
        leaf = queries.detach().to(device).requires_grad_()
        out = hen_fast.retrieve(
            leaf, memories.to(device), values.to(device), beta=0.5, separation=separation,
            backend=backend,
        )  # fmt: skip
        (grad,) = torch.autograd.grad(out.sum(), leaf)
        exact_leaf = queries.detach().double().requires_grad_()
        exact = hen_fast.retrieve(
            exact_leaf, memories.double(), values.double(), beta=0.5, separation=separation
        )
        (expected,) = torch.autograd.grad(exact.sum(), exact_leaf)
        assert rel_err(grad.cpu(), expected) < 1e-5


@needs_cpu_kernel
@pytest.mark.parametrize("bank_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_bank_gradients(gen, bank_dtype):
    """Gradients come back in each leaf's dtype; computed in float32 from the half bank."""
    queries, memories, values = random_problem(gen, max_memories=500)
    queries = queries.float().requires_grad_()
    memories = memories.to(bank_dtype).requires_grad_()
    values = values.to(bank_dtype).requires_grad_()
    out = hen_fast.retrieve(queries, memories, values, beta=0.5, separation="entmax", backend="cpu")
    grads = torch.autograd.grad(out.pow(2).sum(), (queries, memories, values))
    leaves64 = [t.detach().double().requires_grad_() for t in (queries, memories, values)]
    exact = hen_fast.retrieve(*leaves64, beta=0.5, separation="entmax")
    expected = torch.autograd.grad(exact.pow(2).sum(), leaves64)
    for got, want, leaf in zip(grads, expected, (queries, memories, values)):
        assert got.dtype == leaf.dtype
        assert rel_err(got, want) < 1e-2


@needs_cpu_kernel
def test_auto_differentiates_on_the_fused_cpu_kernel():
    request = Request(torch.device("cpu"), (torch.float32,), True, 8, 10_000, "dot", "sparsemax")
    assert select_backend("auto", request).name == "cpu"


@needs_cpu_kernel
def test_opcheck_backward_op_and_autograd_registration():
    """Schema, fake kernels, and the autograd formula registered on hen_fast::retrieve_step
    (opcheck runs the op with inputs that require grad and checks its registration)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=generator)
    keys = torch.randn(700, 8, generator=generator)
    values = torch.randn(700, 3, generator=generator)
    norms = keys.pow(2).sum(1)
    for similarity, separation, alpha in [(0, 0, 2.0), (1, 2, 2.0), (2, 2, 1.5), (0, 1, 2.0)]:
        options = (0.5, similarity, separation, alpha, 3.0)
        sq_norms = norms if similarity == 1 else None
        out, _, _, _, threshold = torch.ops.hen_fast.retrieve_step(
            x, keys, sq_norms, values, *options, 64, False
        )
        grad_out = torch.randn(out.shape, generator=generator)
        torch.library.opcheck(
            torch.ops.hen_fast.retrieve_step_backward.default,
            (grad_out, x, keys, sq_norms, values, out, threshold, *options),
        )
        leaves = [t.clone().requires_grad_() for t in (x, keys, values)]
        torch.library.opcheck(
            torch.ops.hen_fast.retrieve_step.default,
            (leaves[0], leaves[1], sq_norms, leaves[2], *options, 64, False),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
        )


@needs_cpu_kernel
def test_backward_op_degenerate_shapes(gen):
    """One memory, one feature, one value column: gradients still match. With one memory the
    softmax gradient is 0 in exact arithmetic and float32 noise here (dout . out against dout V^T,
    of order eps |dout| |v| |k|); the floor is that product's scale for unit Gaussian inputs."""
    for num_queries, num_memories, dim, value_dim in [(1, 1, 1, 1), (3, 1, 5, 2), (1, 7, 1, 1)]:
        queries = torch.randn(num_queries, dim, generator=gen)
        memories = torch.randn(num_memories, dim, generator=gen)
        values = torch.randn(num_memories, value_dim, generator=gen)
        for separation in ("softmax", "sparsemax", "entmax", "polynomial"):
            check_gradients(
                "cpu", queries, memories, values, gen=gen, separation=separation, floor=10.0
            )
