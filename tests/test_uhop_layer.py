"""UHopHopfieldLayer (U-Hop Section 3) and fit_uhop (Algorithm 2)."""

import copy
import math

import pytest
import torch
from torch import nn

from hen_fast import oracle
from hen_fast.backends import cpu, torch_backend
from hen_fast.uhop.layer import UHopHopfieldLayer, batched_retrieve, fit_uhop

from helpers import randint, rel_err

needs_cpu_kernel = pytest.mark.skipif(
    not cpu.load_extension(), reason="the C++ extension is not built"
)
SEPARATIONS = [("softmax", 1.5), ("sparsemax", 1.5), ("entmax", 1.3)]


def _layer(gen, separation="softmax", alpha=1.5, uhop=True, **kw):
    dims = dict(
        in_dim=randint(gen, 3, 9), hidden_dim=randint(gen, 2, 7), out_dim=randint(gen, 1, 5)
    )
    if uhop:
        dims["feature_dim"] = randint(gen, 2, 8)
    return UHopHopfieldLayer(
        **dims, separation=separation, alpha=alpha, uhop=uhop, generator=gen, **kw
    )


@pytest.mark.parametrize("uhop", [True, False])
@pytest.mark.parametrize("separation, alpha", SEPARATIONS)
def test_forward_is_the_kernelized_hopfield_update(gen, separation, alpha, uhop):
    layer = _layer(gen, separation, alpha, uhop, beta=0.8).double()
    queries = torch.randn(randint(gen, 1, 5), layer.in_dim, generator=gen, dtype=torch.float64)
    memories = torch.randn(randint(gen, 2, 30), layer.in_dim, generator=gen, dtype=torch.float64)
    phi = layer.feature_map if uhop else (lambda x: x)
    if uhop:  # Phi is the normalised linear map
        assert torch.allclose(
            phi(memories).norm(dim=1), torch.ones(memories.shape[0], dtype=torch.float64)
        )
    expected = oracle.naive_retrieve(
        phi(queries) @ layer.query_proj.T,
        phi(memories) @ layer.key_proj.T,
        memories @ layer.value_proj.T,
        beta=0.8,
        separation=separation,
        alpha=alpha,
    )
    assert rel_err(layer(queries, memories), expected) < 1e-12


@needs_cpu_kernel
@pytest.mark.parametrize("separation, alpha", SEPARATIONS)
def test_fused_backward_gives_the_float64_parameter_gradients(gen, separation, alpha):
    """float32 on the fused cpu kernels against a float64 copy on the torch backend."""
    layer = _layer(gen, separation, alpha, backend="cpu", beta=2.0)
    exact = copy.deepcopy(layer).double()
    exact.backend = "torch"
    queries = torch.randn(3, randint(gen, 1, 4), layer.in_dim, generator=gen)
    memories = torch.randn(3, randint(gen, 2, 40), layer.in_dim, generator=gen)
    upstream = torch.randn(3, queries.shape[1], layer.value_proj.shape[0], generator=gen)
    (layer(queries, memories) * upstream).sum().backward()
    (exact(queries.double(), memories.double()) * upstream.double()).sum().backward()
    for (name, got), want in zip(layer.named_parameters(), exact.parameters()):
        assert rel_err(got.grad, want.grad, floor=1e-3) < 1e-4, name


def _sample_set(gen, layer, dtype, samples=None):
    n, b, m = samples or randint(gen, 2, 5), randint(gen, 1, 4), randint(gen, 2, 19)
    queries = torch.randn(n, b, layer.in_dim, generator=gen, dtype=dtype)
    memories = torch.randn(n, m, layer.in_dim, generator=gen, dtype=dtype)
    upstream = torch.randn(n, b, layer.value_proj.shape[0], generator=gen, dtype=dtype)
    return queries, memories, upstream


@pytest.mark.parametrize("separation, alpha", SEPARATIONS + [("entmax", 1.5), ("entmax", 1.8)])
def test_batched_retrieve_equals_the_reference_per_sample(gen, separation, alpha):
    """float64: one batched pass against one torch_backend.retrieve call per sample, forward and the
    gradients of queries, keys and values (beta large enough that the sparse maps are sparse)."""
    n, b, m, h, dv = 3, randint(gen, 2, 5), randint(gen, 5, 23), randint(gen, 3, 7), 3
    leaves = [
        torch.randn(n, rows, cols, generator=gen, dtype=torch.float64).requires_grad_()
        for rows, cols in ((b, h), (m, h), (m, dv))
    ]
    kw = dict(beta=2.5, separation=separation, alpha=alpha)
    out = batched_retrieve(*leaves, **kw)
    assert out.shape == (n, b, dv) and out.dtype == torch.float64
    upstream = torch.randn(n, b, dv, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((out * upstream).sum(), leaves)
    for i in range(n):
        sample = [t[i].detach().clone().requires_grad_() for t in leaves]
        expected, _ = torch_backend.retrieve(*sample, **kw)
        assert rel_err(out[i], expected) < 1e-12
        expected_grads = torch.autograd.grad((expected * upstream[i]).sum(), sample)
        for got, want in zip(grads, expected_grads):
            assert rel_err(got[i], want, floor=1e-3) < 1e-10
    if separation != "softmax":  # the sparse maps really are sparse here: some weights are 0
        weights = oracle.naive_separation(
            2.5 * leaves[0].detach() @ leaves[1].detach().transpose(1, 2), separation, alpha
        )
        assert bool((weights == 0).any())


@pytest.mark.parametrize("separation, alpha", SEPARATIONS)
def test_batched_retrieve_passes_gradcheck(gen, separation, alpha):
    leaves = [
        torch.randn(2, rows, 3, generator=gen, dtype=torch.float64).requires_grad_()
        for rows in (3, 7, 7)
    ]
    assert torch.autograd.gradcheck(
        lambda q, k, v: batched_retrieve(q, k, v, beta=1.7, separation=separation, alpha=alpha),
        leaves,
    )


def test_batched_retrieve_groups_samples_exactly(gen, monkeypatch):
    """Many samples go in groups of about torch_backend.DENSE_MAX_SCORES scores; same result."""
    q, k, v = (torch.randn(7, rows, 4, generator=gen, dtype=torch.float64) for rows in (2, 5, 5))
    whole = batched_retrieve(q, k, v, separation="sparsemax")
    monkeypatch.setattr(torch_backend, "DENSE_MAX_SCORES", 25)  # 2 samples of 2 x 5 scores a group
    assert torch.equal(batched_retrieve(q, k, v, separation="sparsemax"), whole)


@pytest.mark.parametrize("separation, alpha", SEPARATIONS)
def test_layer_batched_path_equals_the_per_sample_path(gen, separation, alpha):
    """float64: small banks (batched) against the per-sample path (batched_max_memories=0,
    one hen_fast.retrieve call per sample and 2-D calls), outputs and parameter gradients."""
    layer = _layer(gen, separation, alpha, beta=1.5).double()
    per_sample = copy.deepcopy(layer)
    per_sample.batched_max_memories = 0
    queries, memories, upstream = _sample_set(gen, layer, torch.float64)
    out = layer(queries, memories)
    (out * upstream).sum().backward()
    (per_sample(queries, memories) * upstream).sum().backward()
    for n in range(queries.shape[0]):
        assert rel_err(out[n], layer(queries[n], memories[n])) < 1e-12
    for (name, got), want in zip(layer.named_parameters(), per_sample.parameters()):
        assert rel_err(got.grad, want.grad, floor=1e-3) < 1e-10, name


@needs_cpu_kernel
@pytest.mark.parametrize("separation, alpha", SEPARATIONS)
def test_layer_batched_path_agrees_with_the_fused_kernels_in_float32(gen, separation, alpha):
    layer = _layer(gen, separation, alpha, backend="cpu", beta=2.0)
    fused = copy.deepcopy(layer)
    fused.batched_max_memories = 0
    queries, memories, upstream = _sample_set(gen, layer, torch.float32)
    out = layer(queries, memories)
    (out * upstream).sum().backward()
    expected = fused(queries, memories)
    (expected * upstream).sum().backward()
    assert rel_err(out, expected) < 1e-5
    for (name, got), want in zip(layer.named_parameters(), fused.parameters()):
        assert rel_err(got.grad, want.grad, floor=1e-3) < 1e-4, name


def test_large_banks_take_the_per_sample_path(gen, monkeypatch):
    import hen_fast.uhop.layer as layer_module

    layer = _layer(gen, batched_max_memories=6).double()
    calls = []
    original = layer_module.batched_retrieve
    monkeypatch.setattr(
        layer_module, "batched_retrieve", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    layer(torch.randn(2, 1, layer.in_dim).double(), torch.randn(2, 7, layer.in_dim).double())
    assert calls == []
    layer(torch.randn(2, 1, layer.in_dim).double(), torch.randn(2, 6, layer.in_dim).double())
    assert calls == [1]


def test_separation_loss_is_definition_3_1(gen):
    """log mean_{u != v} exp(2t (K(u, v)^2 - 1)), K the normalised features' inner product, over
    all rows (a batch of memory sets pooled); the gradient reaches the feature map only."""
    layer = _layer(gen, t=1.5).double()
    memories = torch.randn(3, 6, layer.in_dim, generator=gen, dtype=torch.float64)
    loss = layer.separation_loss(memories)
    phi = layer.feature_map(memories.reshape(-1, layer.in_dim))
    gram = phi @ phi.T
    pairs = ~torch.eye(gram.shape[0], dtype=torch.bool)
    expected = torch.log(torch.exp(2 * 1.5 * (gram[pairs] ** 2 - 1)).mean())
    assert abs(float(loss.detach()) - float(expected.detach())) < 1e-10
    loss.backward()
    assert layer.feature_map.weight.grad is not None
    assert all(p.grad is None for p in (layer.query_proj, layer.key_proj, layer.value_proj))


class _Tiny(nn.Module):
    """A CLS-free model: queries are the mean memory."""

    def __init__(self, layer):
        super().__init__()
        self.hopfield, self.embed = layer, nn.Linear(layer.in_dim, layer.in_dim)

    def memories(self, x):
        return self.embed(x)

    def forward(self, x):
        memories = self.memories(x)
        return self.hopfield(memories.mean(1, keepdim=True), memories).squeeze(1)


@pytest.mark.parametrize("uhop", [True, False])
def test_fit_uhop_alternates_the_two_stages(gen, uhop):
    layer = _layer(gen, uhop=uhop)
    model = _Tiny(layer)
    inputs = torch.randn(40, 5, layer.in_dim, generator=gen)
    targets = torch.randn(40, layer.value_proj.shape[0], generator=gen)
    before = copy.deepcopy(model.state_dict())
    history = fit_uhop(
        model, layer, inputs, targets, nn.functional.mse_loss, model.memories, epochs=2,
        inner_steps=3, batch_size=16, generator=gen, progress=False,
    )  # fmt: skip
    outer = 2 * math.ceil(40 / 16)
    assert len(history["objective"]) == outer
    assert len(history["separation"]) == (3 * outer if uhop else 0)
    assert all(math.isfinite(v) for v in history["objective"] + history["separation"])
    for name, value in model.state_dict().items():
        assert not torch.equal(value, before[name]), name  # every parameter was trained


def test_fit_uhop_leaves_the_feature_map_to_stage_one(gen):
    """Without inner steps the objective's steps never move Phi."""
    layer = _layer(gen)
    model = _Tiny(layer)
    weight = layer.feature_map.weight.detach().clone()
    inputs = torch.randn(20, 4, layer.in_dim, generator=gen)
    targets = torch.randn(20, layer.value_proj.shape[0], generator=gen)
    fit_uhop(
        model, layer, inputs, targets, nn.functional.mse_loss, model.memories, inner_steps=0,
        batch_size=8, progress=False,
    )  # fmt: skip
    assert torch.equal(layer.feature_map.weight, weight)


def test_bad_input_raises_naming_the_argument(gen):
    with pytest.raises(ValueError, match="separation"):
        UHopHopfieldLayer(4, separation="polynomial")
    with pytest.raises(ValueError, match="alpha"):
        UHopHopfieldLayer(4, separation="entmax", alpha=2.5)
    with pytest.raises(ValueError, match="t must"):
        UHopHopfieldLayer(4, t=0.0)
    with pytest.raises(ValueError, match="beta"):
        UHopHopfieldLayer(4, beta=-1.0)
    with pytest.raises(TypeError, match="in_dim"):
        UHopHopfieldLayer(4.5)
    with pytest.raises(ValueError, match="batched_max_memories"):
        UHopHopfieldLayer(4, batched_max_memories=-1)
    layer = UHopHopfieldLayer(4)
    with pytest.raises(ValueError, match="queries must have shape"):
        layer(torch.randn(2, 5), torch.randn(3, 4))
    with pytest.raises(ValueError, match="both be 2-D"):
        layer(torch.randn(2, 4), torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match="same number of samples"):
        layer(torch.randn(2, 1, 4), torch.randn(3, 3, 4))
    with pytest.raises(TypeError, match="memories"):
        layer(torch.randn(2, 4), torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 rows"):
        layer.separation_loss(torch.randn(1, 4))
    with pytest.raises(ValueError, match="uhop=False"):
        UHopHopfieldLayer(4, uhop=False).separation_loss(torch.randn(3, 4))
    with pytest.raises(ValueError, match="same, non-zero number"):
        fit_uhop(layer, layer, torch.randn(3, 4), torch.randn(2, 4), nn.functional.mse_loss,
                 lambda x: x)  # fmt: skip


def test_digits_example_learns_both_ways():
    """Tiny run (300 images, 40 steps, one thread as the script uses): the objective falls and
    training accuracy beats chance (0.1) with and without U-Hop; the script prints the table."""
    from hen_fast.uhop.layer_example import digit_patches, digits_classification

    images = torch.arange(2 * 64.0).reshape(2, 8, 8)
    patches = digit_patches(images)
    assert patches.shape == (2, 16, 4)
    assert patches[0, 1].tolist() == [2.0, 3.0, 10.0, 11.0]  # the second 2x2 block of row 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for uhop in (True, False):
            result = digits_classification(
                uhop, epochs=10, max_samples=300, width=12, progress=False
            )
            assert result["final_objective"] < result["first_objective"] - 0.2, result
            assert result["train_accuracy"] > 0.25 and result["test_accuracy"] > 0.2, result
            assert (result["separation_loss"] is not None) == uhop
    finally:
        torch.set_num_threads(threads)
