"""The tile autoencoders (hen_fast.encoders.tiles), the photos they train on, and the training
script's tile path (denoising loss, resumable checkpoints, the code-size choice)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hen_fast import datasets, encoders
from hen_fast.encoders.tiles import TileAutoencoder, TileEncoder
from hen_fast.hen import HopfieldEncodingNetwork

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def tiny_encoder(channels=1, image_size=16, code_dim=4, seed=0) -> TileEncoder:
    torch.manual_seed(seed)
    return TileEncoder(TileAutoencoder(channels, 4, code_dim, 16), image_size=image_size)


def test_codes_are_per_tile_and_the_latent_mask_is_exact(gen):
    encoder = tiny_encoder(channels=3, image_size=(8, 12))
    assert encoder.latent_dim == 4 * 2 * 3
    images = torch.rand(5, 3, 8, 12, generator=gen)
    known = torch.ones(5, 8, 12, dtype=torch.bool)
    known[:, 5:, :] = False  # the lower tile row partly hidden
    known[1, 0, 0] = False  # and one pixel of image 1's first tile
    mask = encoder.latent_mask(known)
    assert mask.shape == (5, encoder.latent_dim) and mask.dtype == torch.bool
    changed = torch.where(known[:, None], images, torch.rand(images.shape, generator=gen))
    same = encoder.encode(images) == encoder.encode(changed)
    # every coordinate the mask keeps ignores the hidden pixels...
    assert bool(same[mask].all())
    # ...and the mask is exactly the codes of the fully known tiles (channel-major layout)
    expected = torch.zeros(5, 4, 2, 3, dtype=torch.bool)
    expected[:, :, 0, :] = True
    expected[1, :, 0, 0] = False
    assert torch.equal(mask, expected.reshape(5, -1))
    assert not bool(same[~mask].all())  # the hidden tiles' codes did change


def test_round_trip_shapes_range_and_one_tile_alone(gen):
    encoder = tiny_encoder(image_size=16)
    images = torch.rand(3, 1, 16, 16, generator=gen)
    latents = encoder.encode(images)
    decoded = encoder.decode(latents)
    assert decoded.shape == (3, 1, 16, 16)
    assert float(decoded.min()) >= 0.0 and float(decoded.max()) <= 1.0
    # a tile's code is the MLP of that tile's pixels alone, independent of the batch
    block = images[:1, :, 4:8, 8:12] * 2 - 1
    by_hand = encoder.model.encoder(block.reshape(1, -1))[0]
    grid = latents.reshape(3, 4, 4, 4)
    torch.testing.assert_close(grid[0, :, 1, 2], by_hand)


def test_bad_arguments():
    model = TileAutoencoder(1, 8, 4, 16)
    with pytest.raises(ValueError, match="multiple of the tile"):
        TileEncoder(model, image_size=28)
    with pytest.raises(TypeError, match="TileAutoencoder"):
        TileEncoder(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"known must have shape \(N, 32, 32\)"):
        TileEncoder(model).latent_mask(torch.ones(2, 28, 28, dtype=torch.bool))


@pytest.mark.parametrize("name", ["tiles-grey", "tiles-rgb"])
def test_shipped_tile_models_recall_half_hidden_held_out_images(name):
    """Raw pixels + known recall all of these; the tile models, scoring the known tiles' codes
    (exact), must too, on images no model trained or was chosen on."""
    if name not in encoders.available():
        pytest.skip(f"{name} weights are not installed")
    if name == "tiles-grey":
        images = datasets.faces()[:60]
    else:
        images = datasets.heldout_photo_patches(size=32, limit=60)
    network = HopfieldEncodingNetwork(name, progress=False)
    network.store(images)
    cues, known = datasets.mask_lower(images, 0.5)
    hits = network.recall_indices(cues, known=known) == torch.arange(60)
    assert float(hits.float().mean()) >= 0.95
    recalled = network.recall(cues, known=known)
    assert bool(torch.isfinite(recalled).all())
    assert network.encoder.image_size == (32, 32) and network.encoder.tile == 8


def test_training_photos_splits():
    grey, colour = datasets.training_photos(1), datasets.training_photos(3)
    assert all(p.shape[0] == 1 for p in grey) and all(p.shape[0] == 3 for p in colour)
    assert len(grey) == len(colour) + len(datasets.GREY_PHOTOS)
    for photo in grey + colour:
        assert photo.dtype == torch.float32 and 0.0 <= float(photo.min()) <= float(photo.max()) <= 1
    validation = datasets.photo_patches(1, "eval", size=32)
    assert validation.shape[1:] == (1, 32, 32) and validation.shape[0] > 100
    held_out = datasets.heldout_photo_patches(size=32)
    # no validation or held-out patch is a training photo's (sizes differ: compare by content)
    train = datasets.photo_patches(3, "train", size=32)
    assert not bool((torch.cdist(held_out.flatten(1)[:50], train.flatten(1)) < 1e-6).any())
    with pytest.raises(ValueError, match="channels"):
        datasets.training_photos(2)
    with pytest.raises(ValueError, match="split"):
        datasets.training_photos(1, "all")


@pytest.fixture
def script(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    sys.modules.pop("train_autoencoders", None)
    import train_autoencoders

    monkeypatch.setattr(train_autoencoders, "CHECKPOINT_DIR", tmp_path / "checkpoints")
    monkeypatch.setattr(train_autoencoders, "TILE_POOL", 256)
    monkeypatch.setattr(train_autoencoders, "TILE_HIDDEN", 16)
    monkeypatch.setattr(train_autoencoders, "CHECKPOINT_EVERY", 2)
    return train_autoencoders


def test_tile_training_resumes_where_it_stopped(script, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    reference = script.train("tiles-grey", 6, 8, 1e-3, 0, code_dim=4, out_dir=out)
    first = (out / "tiles-grey-c4.safetensors").read_bytes()
    assert reference["eval"]["recon_mse"] > 0 and reference["config"]["code_dim"] == 4
    assert not (tmp_path / "checkpoints" / "tiles-grey-c4.pt").exists()  # removed when done

    calls = {"n": 0}
    real_loss = script.tile_loss

    def stopping_loss(*args):
        calls["n"] += 1
        if calls["n"] == 4:  # stop during step 4 (0-based 3): the checkpoint holds 2 steps
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(script, "tile_loss", stopping_loss)
    with pytest.raises(KeyboardInterrupt):
        script.train("tiles-grey", 6, 8, 1e-3, 0, code_dim=4, out_dir=out)
    assert (tmp_path / "checkpoints" / "tiles-grey-c4.pt").exists()
    monkeypatch.setattr(script, "tile_loss", real_loss)
    capsys.readouterr()
    script.train("tiles-grey", 6, 8, 1e-3, 0, code_dim=4, out_dir=out)
    assert "resuming at step 2 of 6" in capsys.readouterr().out
    # the resumed run ends with the uninterrupted run's weights
    assert (out / "tiles-grey-c4.safetensors").read_bytes() == first


def test_tile_loss_is_a_denoising_objective(script, gen):
    model = TileAutoencoder(1, 8, 4, 16)
    batch = torch.rand(6, 1, 8, 8, generator=gen)
    loss, parts = script.tile_loss(model, batch, torch.Generator().manual_seed(0))
    recon = model.decode(model.encode(batch * 2 - 1))
    clean = (recon - (batch * 2 - 1)).pow(2).mean()
    torch.testing.assert_close(torch.tensor(parts["clean"]), clean.detach())
    assert float(loss.detach()) == pytest.approx((parts["clean"] + parts["noisy"]) / 2, rel=1e-5)
    assert parts["noisy"] != parts["clean"]


def test_loading_a_tile_model_needs_no_diffusers():
    if "tiles-grey" not in encoders.available():
        pytest.skip("tiles-grey weights are not installed")
    code = (
        "import sys, torch, hen_fast.encoders as e; m = e.load('tiles-grey'); "
        "m.decode(m.encode(torch.rand(2, 1, 32, 32))); assert 'diffusers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
