"""U-Hop: Stage I (fit_feature_map), Stage II (uhop.retrieve) and its cache, the baselines, the
experiment commands, and clear errors for bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hen_fast import cli, datasets, oracle, uhop
from hen_fast.uhop import experiments
from hen_fast.uhop.feature_map import FeatureMap

from helpers import rel_err, strided


def _memories(gen, rows=20, dim=12):
    return torch.rand(rows, dim, generator=gen)


def _mnist(count, seed=0):
    images = datasets.mnist5k()[0].flatten(1)
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    return images[order[:count]]


def test_fit_feature_map_lowers_the_loss_and_normalises_w_rows(gen):
    memories = _memories(gen)
    seen = []
    fm = uhop.fit_feature_map(
        memories, steps=15, out_dim=9, generator=gen, callback=lambda s, w: seen.append(s)
    )
    assert isinstance(fm, FeatureMap) and fm.weight.shape == (9, 12)
    assert seen == list(range(1, 16)) and len(fm.loss_history) == 15
    assert fm.loss_history[-1] < fm.loss_history[0]
    assert torch.allclose(fm.weight.norm(dim=1), torch.ones(9), atol=1e-6)
    # final_loss: the separation loss of the returned map's unit-norm features
    features = torch.nn.functional.normalize(fm(memories), dim=1)
    assert abs(fm.final_loss - float(oracle.naive_separation_loss(features))) < 1e-5
    assert not fm.weight.requires_grad and fm(memories).shape == (20, 9)


def test_stage_one_step_is_one_sgd_step_on_the_reference_loss(gen):
    memories = _memories(gen).double()
    start = torch.Generator().manual_seed(5)
    fm = uhop.fit_feature_map(memories, steps=1, lr=0.3, generator=start)
    weight = torch.randn(12, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    weight = (weight / math.sqrt(12)).requires_grad_()
    features = torch.nn.functional.normalize(memories @ weight.T, dim=1)
    oracle.naive_separation_loss(features).backward()
    stepped = weight.detach() - 0.3 * weight.grad
    assert rel_err(fm.weight, stepped / stepped.norm(dim=1, keepdim=True)) < 1e-12


@pytest.mark.parametrize("options", [dict(optimizer="adam", lr=0.05), dict(loss="max")])
def test_fit_feature_map_options(gen, options):
    fm = uhop.fit_feature_map(_memories(gen), steps=5, generator=gen, **options)
    assert len(fm.loss_history) == 5 and math.isfinite(fm.final_loss)


def test_zero_steps_keeps_the_random_full_rank_map(gen):
    fm = uhop.fit_feature_map(_memories(gen), steps=0, generator=gen)
    assert fm.loss_history == [] and torch.linalg.matrix_rank(fm.weight) == 12


def test_normalize_output_gives_unit_features(gen):
    fm = uhop.fit_feature_map(_memories(gen), steps=2, generator=gen, normalize_output=True)
    assert torch.allclose(fm(_memories(gen)).norm(dim=1), torch.ones(20), atol=1e-6)


def test_unnormalised_stage_one_on_images_diverges_with_a_clear_error():
    # Raw W x of digits: huge distances and gradients, SGD at lr 1 blows W up.
    with pytest.raises((FloatingPointError, ValueError), match="diverged|NaN"):
        uhop.fit_feature_map(_mnist(100), steps=100, normalize=False)


def test_retrieve_is_hopfield_retrieval_on_the_features(gen):
    memories = strided(_memories(gen).double(), gen)
    queries = _memories(gen, rows=5).double()
    fm = uhop.fit_feature_map(memories, steps=3, generator=gen)
    for separation in ("softmax", "sparsemax", "entmax"):
        got = uhop.retrieve(queries, memories, fm, beta=3.0, separation=separation)
        want = oracle.naive_retrieve(
            fm(queries), fm(memories), memories, beta=3.0, separation=separation
        )
        assert rel_err(got, want) < 1e-10, separation
    one = uhop.retrieve(queries[0], memories, fm, beta=3.0)
    assert (
        one.shape == (12,)
        and rel_err(one, uhop.retrieve(queries, memories, fm, beta=3.0)[0]) < 1e-12
    )
    twice = uhop.retrieve(queries, memories, fm, beta=3.0, steps=2)
    step = lambda x: oracle.naive_retrieve(fm(x), fm(memories), memories, beta=3.0)  # noqa: E731
    assert rel_err(twice, step(step(queries))) < 1e-10


def test_projected_bank_is_cached_until_memories_or_map_change(gen):
    memories = _memories(gen)
    fm = uhop.fit_feature_map(memories, steps=1, generator=gen)
    keys = uhop.projected_bank(memories, fm)
    assert uhop.projected_bank(memories, fm) is keys
    memories[0] += 1.0  # in place: the cached keys are stale
    fresh = uhop.projected_bank(memories, fm)
    assert fresh is not keys and rel_err(fresh, fm(memories)) < 1e-7
    with torch.no_grad():
        fm.weight.mul_(2.0)
    assert rel_err(uhop.projected_bank(memories, fm), fm(memories)) < 1e-7
    other = memories.clone()
    assert uhop.projected_bank(other, fm) is not uhop.projected_bank(memories, fm)


def test_uhop_beats_mhm_on_mnist_by_far():
    memories = _mnist(60)
    queries = experiments.masked_queries(memories, seed=0)
    fm = uhop.fit_feature_map(memories, steps=20, generator=torch.Generator().manual_seed(0))
    errors = experiments.evaluate(queries, memories, fm, ["uhop", "mhm"], beta=1.0)
    assert errors["uhop"] < 0.7 * errors["mhm"], errors


@pytest.mark.parametrize("name", list(uhop.BASELINES))
def test_baselines_are_the_papers_retrievals(gen, name):
    memories, queries = _memories(gen), _memories(gen, rows=4)
    got = uhop.baseline_retrieve(name, queries, memories, beta=2.0)
    want = oracle.naive_retrieve(queries, memories, beta=2.0, **uhop.BASELINES[name])
    assert rel_err(got, want) < 1e-5


def test_noisy_queries_have_the_requested_noise_norm(gen):
    memories = _memories(gen)
    queries = experiments.noisy_queries(memories, 0.7, seed=3)
    ratio = (queries - memories).norm(dim=1) / memories.norm(dim=1)
    assert torch.allclose(ratio, torch.full_like(ratio, 0.7), atol=1e-5)


def test_summary_reports_uhop_over_mhm_per_size_and_on_average():
    records = [
        dict(size=10, errors=dict(uhop=1.0, mhm=4.0)),
        dict(size=10, errors=dict(uhop=3.0, mhm=4.0)),
        dict(size=20, errors=dict(uhop=1.0, mhm=2.0)),
    ]
    summary = experiments.summarise("capacity", records)
    assert summary["uhop"]["10"] == dict(mean=2.0, std=math.sqrt(2.0), n=2)
    assert summary["uhop_over_mhm"] == {"10": 0.5, "20": 0.5}
    assert summary["uhop_over_mhm_mean"] == 0.5


def test_capacity_command_writes_json_and_png(tmp_path, capsys):
    argv = ["uhop-capacity", "--sizes", "6", "9", "--repeats", "2", "1", "--steps", "2"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "capacity-mnist.json").read_text())
    assert (tmp_path / "capacity-mnist.png").stat().st_size > 0
    assert [r["size"] for r in result["records"]] == [6, 6, 9]
    assert set(result["records"][0]["errors"]) == set(experiments.MODELS)
    assert "U-Hop error / MHM error" in capsys.readouterr().out


def test_other_experiments_write_json_and_png(tmp_path):
    for argv in (
        ["uhop-noise", "--size", "8", "--levels", "0", "0.5", "--repeats", "1", "--steps", "1"],
        ["uhop-iterations", "--size", "8", "--checkpoints", "1", "3", "--repeats", "1"],
        ["uhop-loss-error", "--size", "8", "--runs", "2", "--max-steps", "2"],
    ):
        assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(
        f"{kind}-mnist.{ext}"
        for kind in ("noise", "iterations", "loss_vs_error")
        for ext in ("json", "png")
    )
    iters = json.loads((tmp_path / "iterations-mnist.json").read_text())
    assert [r["steps"] for r in iters["records"]] == [1, 3]


@pytest.mark.parametrize(
    "argv",
    [
        ["uhop-capacity", "--sizes", "1"],
        ["uhop-capacity", "--sizes", "10", "20", "--repeats", "1", "2", "3"],
        ["uhop-noise", "--repeats", "0"],
        ["uhop-iterations", "--checkpoints", "0"],
        ["uhop-loss-error", "--size", "1"],
    ],
)
def test_experiment_commands_reject_bad_counts(argv, capsys):
    assert cli.main(argv) == 2
    assert "--" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(t=0.0), ValueError, "t must be"),
        (dict(t=-2.0), ValueError, "t must be"),
        (dict(steps=-1), ValueError, "steps must be >= 0"),
        (dict(steps=1.5), TypeError, "steps must be an int"),
        (dict(lr=0.0), ValueError, "lr must be"),
        (dict(out_dim=0), ValueError, "out_dim"),
        (dict(optimizer="lbfgs"), ValueError, "optimizer"),
        (dict(loss="sum"), ValueError, "loss must be"),
    ],
)
def test_fit_feature_map_bad_arguments(gen, kwargs, error, match):
    with pytest.raises(error, match=match):
        uhop.fit_feature_map(_memories(gen), **kwargs)


@pytest.mark.parametrize(
    "memories, error, match",
    [
        (torch.rand(1, 5), ValueError, "at least 2 patterns"),
        (torch.rand(5), ValueError, r"shape \(M, d\)"),
        (torch.ones(4, 3, dtype=torch.long), TypeError, "floating-point"),
        ("memories", TypeError, "torch.Tensor"),
    ],
)
def test_fit_feature_map_bad_memories(memories, error, match):
    with pytest.raises(error, match=match):
        uhop.fit_feature_map(memories)


def test_retrieve_bad_arguments(gen):
    memories = _memories(gen)
    fm = uhop.fit_feature_map(memories, steps=0, generator=gen)
    wrong = FeatureMap(torch.randn(4, 7))
    with pytest.raises(ValueError, match="feature_map takes inputs of dimension 7"):
        uhop.retrieve(memories[:2], memories, wrong)
    with pytest.raises(ValueError, match="inputs of dimension 7"):
        wrong(memories)
    with pytest.raises(ValueError, match="queries must have shape"):
        uhop.retrieve(torch.rand(2, 5), memories, fm)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        uhop.retrieve(memories[:2], memories, fm, steps=0)
    with pytest.raises(TypeError, match="feature_map must be callable"):
        uhop.retrieve(memories[:2], memories, "phi")
    with pytest.raises(ValueError, match="beta must be > 0"):
        uhop.retrieve(memories[:2], memories, fm, beta=0.0)
    with pytest.raises(ValueError, match="name must be one of"):
        uhop.baseline_retrieve("hopfield", memories[:2], memories)
