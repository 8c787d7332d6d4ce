"""HopfieldEncodingNetwork and HeteroAssociativeNetwork: round trips, occlusion-aware recall
against the reference, hetero recall by caption, bad input."""

import hashlib

import pytest
import torch

import hen_fast
from hen_fast import datasets, encoders, oracle
from hen_fast.hen import HeteroAssociativeNetwork, HopfieldEncodingNetwork

from helpers import randint, rel_err


class PoolEncoder(encoders.Encoder):
    """A small linear encoder for tests: 2x2 average pooling, decoded by nearest upsampling."""

    name = "pool"

    def __init__(self, size=(6, 8), channels=1, recommended=None):
        self.image_size, self.channels = size, channels
        self.latent_dim = channels * size[0] * size[1] // 4
        self.recommended = recommended or {}

    def _encode_batch(self, images):
        return torch.nn.functional.avg_pool2d(images, 2).flatten(1)

    def _decode_batch(self, latents):
        h, w = self.image_size[0] // 2, self.image_size[1] // 2
        grid = latents.reshape(-1, self.channels, h, w)
        return grid.repeat_interleave(2, 2).repeat_interleave(2, 3)


class HashText:
    """A deterministic stand-in text encoder: a random unit vector per distinct caption."""

    def encode(self, captions):
        rows = []
        for caption in captions:
            seed = int(hashlib.sha256(caption.encode()).hexdigest()[:8], 16)
            rows.append(torch.randn(24, generator=torch.Generator().manual_seed(seed)))
        return torch.nn.functional.normalize(torch.stack(rows), dim=1)


def random_images(gen, count, channels=1, size=(7, 5)):
    return torch.rand(count, channels, *size, generator=gen)


def test_round_trip_on_raw_pixels(gen):
    count = randint(gen, 5, 40)
    images = random_images(gen, count, channels=3)
    net = HopfieldEncodingNetwork(
        encoders.IdentityEncoder(image_size=(7, 5), channels=3), beta=200.0, similarity="l2"
    )
    assert len(net) == 0
    assert net.store(images[:3]) == range(0, 3)
    assert net.store(images[3:]) == range(3, count)
    assert len(net) == count
    recalled = net.recall(images)
    assert recalled.shape == images.shape
    assert rel_err(recalled, images) < 1e-4
    assert torch.equal(net.recall_indices(images), torch.arange(count))


def test_defaults_come_from_the_encoder():
    recommended = {"beta": 3.0, "similarity": "manhattan", "separation": "sparsemax", "steps": 2}
    net = HopfieldEncodingNetwork(PoolEncoder(recommended=recommended))
    assert (net.beta, net.similarity, net.separation, net.steps) == (
        3.0,
        "manhattan",
        "sparsemax",
        2,
    )
    net = HopfieldEncodingNetwork(PoolEncoder(recommended=recommended), beta=0.5, steps=1)
    assert (net.beta, net.steps, net.similarity) == (0.5, 1, "manhattan")
    bare = HopfieldEncodingNetwork(PoolEncoder())
    assert (bare.beta, bare.similarity, bare.separation, bare.steps) == (1.0, "dot", "softmax", 1)
    named = HopfieldEncodingNetwork("identity")
    assert isinstance(named.encoder, encoders.IdentityEncoder)
    assert named.beta == named.encoder.recommended["beta"]


@pytest.mark.parametrize("similarity", ["dot", "l2", "manhattan"])
@pytest.mark.parametrize("separation", ["softmax", "sparsemax"])
def test_known_pixels_score_like_masked_keys(gen, similarity, separation):
    """Occlusion-aware recall on pixels equals the definition: per query, the reference on the
    query and keys restricted to its known pixels, values the full memories."""
    count, queries = randint(gen, 4, 30), randint(gen, 1, 6)
    images = random_images(gen, count)
    cues = random_images(gen, queries)
    known = torch.rand(queries, 1, 7, 5, generator=gen) < 0.6
    if randint(gen, 0, 1):  # a shared mask too: one grouped call for manhattan
        known[1:] = known[0]
    net = HopfieldEncodingNetwork(
        encoders.IdentityEncoder(image_size=(7, 5)),
        beta=2.0,
        similarity=similarity,
        separation=separation,
    )
    net.store(images)
    got = net.recall(cues, known=known).flatten(1)
    indices = net.recall_indices(cues, known=known)
    bank = images.flatten(1).double()
    for row in range(queries):
        mask = known[row].flatten().double()
        want, info = oracle.naive_retrieve(
            (cues[row].flatten().double() * mask)[None],
            bank * mask,
            bank,
            beta=2.0,
            similarity=similarity,
            separation=separation,
            return_info=True,
        )
        assert rel_err(got[row], want[0]) < 1e-5
        assert indices[row] == info.argmax[0]


def test_known_pixels_help_occluded_cues(gen):
    images = random_images(gen, 30, size=(8, 8))
    cues, known = datasets.mask_lower_half(images)
    net = HopfieldEncodingNetwork(
        encoders.IdentityEncoder(image_size=(8, 8)), beta=50.0, similarity="l2"
    )
    net.store(images)
    assert torch.equal(net.recall_indices(cues, known=known), torch.arange(30))


def tiled_encoder():
    """The shipped architecture at tiny widths, random weights, 32x32 colour in 8x8 tiles."""
    from hen_fast.encoders.shipped import autoencoder_config

    config = autoencoder_config(3, 32, widths=(8, 8, 16), norm_groups=4)
    return encoders.load("diffusers-kl", config=config, seed=5, tile=8)


def test_known_scores_the_latent_mask_of_a_tiled_encoder(gen):
    """With an exact latent mask a cue's masked latents are its memory's, so even random weights
    recall every occluded image; the recall is the masked retrieve by hand, and what the cue
    holds in its hidden pixels does not matter."""
    encoder = tiled_encoder()
    images = random_images(gen, 24, channels=3, size=(32, 32))
    net = HopfieldEncodingNetwork(encoder, beta=3.0, similarity="l2", steps=3)
    net.store(images)
    cues, known = datasets.mask_lower(images, 0.4)
    garbage = torch.where(known, cues, torch.rand(cues.shape, generator=gen))
    assert torch.equal(net.recall_indices(garbage, known=known), torch.arange(24))
    mask = encoder.latent_mask(known[:, 0])
    by_hand = hen_fast.retrieve(encoder.encode(cues), net.latents, beta=3.0, similarity="l2",
                                score_mask=mask)  # fmt: skip
    assert rel_err(net.recall(garbage, known=known), encoder.decode(by_hand)) < 1e-5
    # without known the hidden pixels count
    assert rel_err(net.recall(garbage), net.recall(cues)) > 1e-3


def test_a_cue_that_determines_no_latent_is_scored_on_all(gen):
    encoder = tiled_encoder()
    images = random_images(gen, 6, channels=3, size=(32, 32))
    net = HopfieldEncodingNetwork(encoder, beta=3.0, similarity="l2")
    net.store(images)
    known = torch.zeros(2, 3, 32, 32, dtype=torch.bool)
    known[:, :, ::2, ::2] = True  # every tile has hidden pixels
    cues = torch.where(known, images[:2], 0.0)
    assert not encoder.latent_mask(known[:, 0]).any()
    assert rel_err(net.recall(cues, known=known), net.recall(cues)) < 1e-6


def test_hidden_pixels_are_never_read(gen):
    """Non-spatial latents (the pool test encoder has no latent_mask) put the known pixels back
    between updates; the hidden ones are zeros to the encoder either way."""
    net = HopfieldEncodingNetwork(PoolEncoder(), beta=5.0, similarity="dot", steps=3)
    images = random_images(gen, 12, size=(6, 8))
    net.store(images)
    cues, known = datasets.mask_random(images[:4], seed=randint(gen, 0, 99))
    garbage = torch.where(known, cues, torch.rand(cues.shape, generator=gen))
    assert torch.equal(net.recall(garbage, known=known), net.recall(cues, known=known))


def test_encoder_recall_reimposes_known_pixels(gen):
    encoder = PoolEncoder()
    images = random_images(gen, 12, size=(6, 8))
    net = HopfieldEncodingNetwork(encoder, beta=5.0, similarity="dot", steps=3)
    net.store(images)
    cues, known = datasets.mask_random(images[:4], seed=randint(gen, 0, 99))
    # By hand: update, decode, put the known pixels back, re-encode; three updates.
    latents = encoder.encode(cues)
    for step in range(3):
        latents = hen_fast.retrieve(latents, net.latents, beta=5.0)
        if step < 2:
            latents = encoder.encode(torch.where(known, cues, encoder.decode(latents)))
    assert rel_err(net.recall(cues, known=known), encoder.decode(latents)) < 1e-5
    # Without the mask, three plain updates in latent space.
    plain = hen_fast.retrieve(encoder.encode(cues), net.latents, beta=5.0, steps=3)
    assert rel_err(net.recall(cues), encoder.decode(plain)) < 1e-5


def test_cues_are_converted_to_the_encoder(gen):
    net = HopfieldEncodingNetwork(PoolEncoder(size=(6, 8), channels=1), beta=100.0, similarity="l2")
    images = random_images(gen, 5, channels=3, size=(12, 16))  # RGB, twice the size
    net.store(images)
    assert net.recall(images).shape == (5, 1, 6, 8)
    assert torch.equal(net.recall_indices(images), torch.arange(5))


def test_bad_input_raises_and_stores_nothing(gen):
    net = HopfieldEncodingNetwork(encoders.IdentityEncoder(image_size=(7, 5)))
    good = random_images(gen, 4)
    with pytest.raises(ValueError, match="empty"):
        net.recall(good)
    net.store(good)
    nan_batch = random_images(gen, 3)
    nan_batch[2, 0, 1, 1] = float("nan")
    bad_batches = {
        "rank 4": good[0],
        "channels": torch.rand(2, 5, 7, 5),
        r"\[0, 1\]": good * 2,
        "NaN": nan_batch,
        "nothing to store": good[:0],
    }
    for message, batch in bad_batches.items():
        with pytest.raises(ValueError, match=message):
            net.store(batch)
        assert len(net) == 4  # nothing stored half-way
    with pytest.raises(TypeError, match="floating point"):
        net.store(torch.zeros(2, 1, 7, 5, dtype=torch.uint8))
    with pytest.raises(TypeError, match="known"):
        net.recall(good, known=torch.ones(4, 1, 7, 5))
    with pytest.raises(ValueError, match="broadcast"):
        net.recall(good, known=torch.ones(3, 1, 7, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="beta"):
        HopfieldEncodingNetwork("identity", beta=-1.0)
    with pytest.raises(ValueError, match="similarity"):
        HopfieldEncodingNetwork("identity", similarity="cosine")
    with pytest.raises(ValueError, match="steps"):
        HopfieldEncodingNetwork("identity", steps=0)
    with pytest.raises(TypeError, match="encoder"):
        HopfieldEncodingNetwork(42)


def test_hetero_recall_by_caption(gen):
    count = randint(gen, 8, 30)
    images = random_images(gen, count, size=(6, 8))
    captions = [f"picture number {i}" for i in range(count)]
    for clamp in (True, False):
        net = HeteroAssociativeNetwork(PoolEncoder(), HashText(), clamp=clamp)
        net.store(images[:5], captions[:5])
        net.store(images[5:], captions[5:])
        assert len(net) == count
        # both parts unit norm on average, by the first batch's scales
        parts = net.memories[:5].split([net.encoder.latent_dim, 24], 1)
        assert [float(p.norm(dim=1).mean()) for p in parts] == pytest.approx([1.0, 1.0])
        assert torch.equal(net.recall_indices(captions), torch.arange(count))
        images_back, indices = net.recall_with_indices(captions)
        assert torch.equal(indices, torch.arange(count))
        assert torch.equal(images_back, net.recall(captions))
        expected = net.encoder.decode(net.encoder.encode(images))
        assert rel_err(net.recall(captions), expected) < 1e-4


def test_hetero_shared_caption_recalls_a_mixture(gen):
    """Non-unique association (the paper's Fig. 6): two images with one caption come back as
    their average, neither image."""
    images = random_images(gen, 6, size=(6, 8))
    captions = ["a", "b", "same", "same", "c", "d"]
    net = HeteroAssociativeNetwork(PoolEncoder(), HashText(), steps=1)
    net.store(images, captions)
    recalled = net.recall(["same"])
    decoded = net.encoder.decode(net.encoder.encode(images[2:4]))
    assert rel_err(recalled[0], decoded.mean(0)) < 1e-3
    assert (recalled[0] - decoded[0]).abs().max() > 0.05


def test_hetero_bad_input(gen):
    net = HeteroAssociativeNetwork(PoolEncoder(), HashText())
    images = random_images(gen, 3, size=(6, 8))
    with pytest.raises(ValueError, match="empty"):
        net.recall(["x"])
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        net.store(images, ["a", "b"])
    with pytest.raises(TypeError, match="list of str"):
        net.store(images, "abc")
    with pytest.raises(TypeError, match=r"captions\[1\]"):
        net.store(images, ["a", 2, "c"])
    assert len(net) == 0
    with pytest.raises(TypeError, match="text_encoder"):
        HeteroAssociativeNetwork(PoolEncoder(), object())


@pytest.mark.parametrize("name", encoders.SHIPPED)
def test_shipped_encoder_round_trip(name):
    """The shipped autoencoders with their recommended settings: stored eval images come back
    from themselves and from noisy copies."""
    if name not in encoders.available():
        pytest.skip(f"{name} weights are not installed")
    if name.startswith("mnist"):
        images = datasets.mnist5k("eval")[0][:40]
    else:
        images = datasets.natural_patches("eval", size=32, limit=40)
    net = HopfieldEncodingNetwork(name)
    net.store(images)
    # dot similarity (a recommended setting) can prefer a larger-norm neighbour over the image
    # itself, so not every image need recall itself; nearly all must
    assert (net.recall_indices(images) == torch.arange(40)).float().mean() >= 0.95
    noisy = datasets.add_noise(images, 0.1, seed=1)
    assert (net.recall_indices(noisy) == torch.arange(40)).float().mean() >= 0.9
    recalled = net.recall(images)
    assert recalled.shape == (40, net.encoder.channels, *net.encoder.image_size)
    assert bool(torch.isfinite(recalled).all())
