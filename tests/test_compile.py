"""hen_fast.retrieve under torch.compile(fullgraph=True): one graph, the eager results.

Compiling is slow (seconds per graph on a small CPU), so the matrices use the ``aot_eager``
backend: it captures the whole graph with dynamo and traces it through AOT autograd with the ops'
fake kernels, which is where graph breaks and wrong fake shapes show, and then runs the traced
ops without generating code. Inductor, the default backend, compiles a representative subset
(one combination per similarity, every separation family) and the NaN and nn.Module tests.
"""

import dataclasses
import os

import pytest
import torch
import torch._dynamo

import hen_fast
from hen_fast import MemoryBank
from hen_fast.backends import cpu, register_backend
from hen_fast.loop import _iterate_masked, iterate

from helpers import (
    COMBINATIONS,
    check_against_reference,
    combo_id,
    combo_kwargs,
    random_problem,
    rel_err,
    tolerance,
    value_scale,
)

if not cpu.load_extension():
    if os.environ.get("HEN_FAST_REQUIRE_EXT") == "1":
        raise RuntimeError("HEN_FAST_REQUIRE_EXT=1 but hen_fast._C did not load")
    pytest.skip("the C++ extension is not built", allow_module_level=True)

STEPS, TOL = 3, 0.05  # a tol that stops some queries early in most combinations
DENSE = [c for c in COMBINATIONS if c[1] in ("softmax", "polynomial")]
# One combination per similarity, covering the dense, sparsemax and entmax (Newton) kernels.
INDUCTOR_SUBSET = [
    ("dot", "polynomial", 1.5),
    ("l2", "sparsemax", 1.5),
    ("manhattan", "entmax", 1.25),
]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cache hit, guard or recompile limit from another."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _problem(gen):
    queries, memories, values = random_problem(gen, dtype=torch.float32, max_memories=300)
    clamp_mask = torch.rand(queries.shape[1], generator=gen) < 0.3
    return queries, memories, values, clamp_mask


def _two_calls(kwargs, backend, clamp_mask):
    """One update to separate values, and STEPS updates with tol and clamp_mask, in one graph."""

    def both(queries, memories, values):
        single = hen_fast.retrieve(queries, memories, values, backend=backend, **kwargs)
        looped = hen_fast.retrieve(queries, memories, steps=STEPS, tol=TOL, clamp_mask=clamp_mask,
                                   return_info=True, backend=backend, **kwargs)  # fmt: skip
        return single, looped

    return both


def _check_compiled(compiled, eager, queries, memories, values, clamp_mask, kwargs, backend):
    (single, (out, info)), (e_single, (e_out, e_info)) = compiled, eager
    # Against eager: the same kernels on the same rows, to the table's float32 tolerance (a
    # compiler may fuse the elementwise ops around them and round differently).
    assert rel_err(single, e_single, scale=value_scale(values)) < tolerance(backend=backend)
    scale = value_scale(memories)
    assert rel_err(out, e_out, scale=scale) < tolerance(backend=backend, steps=STEPS)
    assert torch.equal(info.steps, e_info.steps)
    assert torch.equal(info.argmax, e_info.argmax)
    assert int((info.support - e_info.support).abs().max()) <= 2
    # Against the float64 oracle, with the rules every float32 backend meets.
    check_against_reference(single, None, queries, memories, values, **kwargs)
    check_against_reference(out, info, queries, memories, None, steps=STEPS, tol=TOL,
                            clamp_mask=clamp_mask, **kwargs)  # fmt: skip


def _compile_and_check(gen, combo, backend, compiler):
    queries, memories, values, clamp_mask = _problem(gen)
    kwargs = combo_kwargs(combo)
    fn = _two_calls(kwargs, backend, clamp_mask)
    compiled = torch.compile(fn, fullgraph=True, backend=compiler)(queries, memories, values)
    eager = fn(queries, memories, values)
    _check_compiled(compiled, eager, queries, memories, values, clamp_mask, kwargs, backend)


@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_cpu_backend_compiles_to_one_graph(gen, combo):
    _compile_and_check(gen, combo, "cpu", "aot_eager")


@pytest.mark.parametrize("combo", DENSE, ids=combo_id)
def test_torch_backend_dense_compiles_to_one_graph(gen, combo):
    """The torch backend's softmax and polynomial steps trace whole; its sparse thresholds do
    not (see test_auto_under_compile_prefers_a_backend_that_traces)."""
    _compile_and_check(gen, combo, "torch", "aot_eager")


@pytest.mark.parametrize("combo", INDUCTOR_SUBSET, ids=combo_id)
def test_inductor_matches_eager(gen, combo):
    _compile_and_check(gen, combo, "cpu", "inductor")


def test_auto_under_compile_prefers_a_backend_that_traces(gen):
    """Eager "auto" follows the speed rules; compiled, it skips a backend that would break the
    graph (the torch backend's sparse thresholds branch on data) even against a rule. Here a rule
    sends sparsemax to torch, with more memories than torch's candidate buffer (its Newton
    fallback); compiled, auto computes on the cpu kernel in one graph."""
    original = cpu.BACKEND
    slower = dataclasses.replace(original, auto_check=lambda request: "slower, for this test")
    queries = torch.randn(4, 8, generator=gen)
    memories = torch.randn(1000, 8, generator=gen)

    def fn(queries, memories):
        return hen_fast.retrieve(queries, memories, beta=0.05, separation="sparsemax")

    register_backend(slower)
    try:
        expected = hen_fast.retrieve(queries, memories, beta=0.05, separation="sparsemax",
                                     backend="cpu")  # fmt: skip
        out = torch.compile(fn, fullgraph=True, backend="aot_eager")(queries, memories)
        torch._dynamo.reset()
        with pytest.raises(Exception, match="data-dependent"):  # what auto avoids
            torch.compile(
                lambda q, k: hen_fast.retrieve(
                    q, k, beta=0.05, separation="sparsemax", backend="torch"
                ),  # fmt: skip
                fullgraph=True,
                backend="aot_eager",
            )(queries, memories)
    finally:
        register_backend(original)
    assert torch.equal(out, expected)


def test_nan_raises_when_the_compiled_graph_runs():
    """The finiteness check is an op of the graph (torch._assert_async): compiling succeeds, and
    each run with a NaN or Inf input raises the eager message (as a RuntimeError)."""
    queries, memories, values = torch.randn(3, 5), torch.randn(20, 5), torch.randn(20, 2)
    compiled = torch.compile(lambda q, k, v: hen_fast.retrieve(q, k, v), fullgraph=True)
    expected = hen_fast.retrieve(queries, memories, values)
    assert torch.allclose(compiled(queries, memories, values), expected, atol=1e-6)
    for name in ("queries", "memories", "values"):
        bad = dict(queries=queries, memories=memories, values=values)
        bad[name] = bad[name].clone()
        bad[name][1, 1] = float("nan") if name != "memories" else float("inf")
        with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
            hen_fast.retrieve(bad["queries"], bad["memories"], bad["values"])
        with pytest.raises(RuntimeError, match=f"{name} contains NaN or Inf"):
            compiled(bad["queries"], bad["memories"], bad["values"])
    unchecked = torch.compile(
        lambda q, k: hen_fast.retrieve(q, k, check_finite=False), fullgraph=True,
        backend="aot_eager",
    )  # fmt: skip
    nan_query = queries.clone()
    nan_query[0, 0] = float("nan")
    out = unchecked(nan_query, memories)
    assert bool(out[0].isnan().all()) and bool(out[1:].isfinite().all())


class _Associative(torch.nn.Module):
    """A learned projection into a learned memory, retrieved by entmax (up to 3 steps, tol)."""

    def __init__(self, dim: int, num_memories: int, gen: torch.Generator):
        super().__init__()
        self.project = torch.nn.Linear(dim, dim)
        self.memories = torch.nn.Parameter(torch.randn(num_memories, dim, generator=gen))

    def forward(self, x):
        return hen_fast.retrieve(self.project(x), self.memories, beta=0.7, separation="entmax",
                                 alpha=1.5, steps=3, tol=1e-4)  # fmt: skip


def test_compiled_module_trains_like_eager(gen):
    """A compiled nn.Module that calls retrieve in its forward: output and every parameter's
    gradient (through the op's registered backward) match eager."""
    module = _Associative(8, 40, gen)
    x = torch.randn(6, 8, generator=gen)
    compiled = torch.compile(module, fullgraph=True)

    def output_and_grads(model):
        module.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in module.parameters()]

    out, grads = output_and_grads(compiled)
    eager_out, eager_grads = output_and_grads(module)
    assert rel_err(out, eager_out, scale=value_scale(module.memories)) < tolerance(backend="cpu")
    for grad, eager_grad in zip(grads, eager_grads):
        assert rel_err(grad, eager_grad) < 1e-5


def test_dynamic_shapes_and_default_arguments(gen):
    """compile(dynamic=True) makes retrieve's float defaults (beta, alpha, degree) symbolic: the
    checks guard on them instead of failing, and one graph serves several batch sizes."""
    compiled = torch.compile(
        lambda q, k: hen_fast.retrieve(
            q, k, separation="entmax", steps=STEPS, tol=TOL, return_info=True
        ),  # fmt: skip
        fullgraph=True,
        dynamic=True,
        backend="aot_eager",
    )
    for num_queries, num_memories in ((3, 50), (7, 90)):
        queries = torch.randn(num_queries, 8, generator=gen)
        memories = torch.randn(num_memories, 8, generator=gen)
        out, info = compiled(queries, memories)
        eager_out, eager_info = hen_fast.retrieve(
            queries, memories, separation="entmax", steps=STEPS, tol=TOL, return_info=True
        )
        assert rel_err(out, eager_out, scale=value_scale(memories)) < tolerance(steps=STEPS)
        assert torch.equal(info.steps, eager_info.steps)


def test_memory_bank_and_single_query(gen):
    bank = MemoryBank(torch.randn(60, 8, generator=gen), torch.randn(60, 3, generator=gen))
    query = torch.randn(8, generator=gen)
    compiled = torch.compile(
        lambda q: hen_fast.retrieve(q, bank, separation="sparsemax", return_info=True),
        fullgraph=True,
        backend="aot_eager",
    )
    out, info = compiled(query)
    eager_out, eager_info = hen_fast.retrieve(query, bank, separation="sparsemax",
                                              return_info=True)  # fmt: skip
    assert out.shape == (3,) and info.steps.shape == ()
    assert rel_err(out, eager_out, scale=value_scale(bank.state.values)) < tolerance()
    with pytest.raises(RuntimeError, match="queries contains NaN or Inf"):
        compiled(torch.full((8,), float("nan")))


def test_masked_loop_is_the_eager_loop():
    """The fixed-trip loop that compiled code runs with tol stops each query at the step the eager
    loop does, with the same iterate and info (checked eagerly, on a step function whose rows
    stop after 1, 2, 3 steps or never)."""
    queries = torch.tensor([[0.0, 0.0], [1.0, 1.0], [4.0, -4.0], [100.0, 1.0]])

    def halve(rows):
        new = rows / 2
        norms = rows.norm(dim=1)
        return new, norms.long(), (norms > 1).long(), norms

    mask = torch.tensor([False, True])
    for steps, tol, clamp_mask in ((4, 1.0, None), (4, 1.0, mask), (2, 0.0, None)):
        kwargs = dict(steps=steps, tol=tol, clamp_mask=clamp_mask, return_info=True)
        out, info = iterate(halve, queries, torch.float64, **kwargs)
        masked_out, masked_info = _iterate_masked(halve, queries, torch.float64, **kwargs)
        assert torch.equal(out, masked_out)
        for field, masked_field in zip(info.as_tuple(), masked_info.as_tuple()):
            assert torch.equal(field, masked_field)
    assert info.steps.tolist() == [1, 2, 2, 2]


def test_compiled_tol_stops_each_query_at_the_eager_step(gen):
    """Queries that stop after different numbers of steps: a stored pattern (a fixed point: it
    stops after one step), one near a pattern (lands on it, stops after two), random ones (most
    land on a pattern within a few steps). The compiled fixed-trip loop reports the eager steps
    and the same outputs."""
    patterns = 6.0 * torch.eye(8)
    memories = torch.cat([patterns, torch.randn(30, 8, generator=gen)])
    queries = torch.cat(
        [patterns[:1], patterns[1:2] + 0.1 * torch.randn(1, 8, generator=gen),
         torch.randn(3, 8, generator=gen)]
    )  # fmt: skip

    def fn(queries, memories):
        return hen_fast.retrieve(queries, memories, beta=0.3, separation="sparsemax", steps=4,
                                 tol=1e-6, return_info=True, backend="cpu")  # fmt: skip

    out, info = torch.compile(fn, fullgraph=True, backend="aot_eager")(queries, memories)
    eager_out, eager_info = fn(queries, memories)
    assert len(set(eager_info.steps.tolist())) > 1, eager_info.steps  # the test stops some
    assert torch.equal(info.steps, eager_info.steps)
    assert rel_err(out, eager_out, scale=6.0) < tolerance(steps=4)


def test_backend_probes_are_marked_as_torch_marks_constants():
    """hen_fast marks its availability probes constant for dynamo without importing it (see
    hen_fast.backends.constant_under_compile): torch's decorator must still mean the same."""
    marked = torch.compiler.assume_constant_result(lambda: None)
    assert getattr(marked, "_dynamo_marked_constant", False)
    assert cpu.extension_loaded._dynamo_marked_constant
