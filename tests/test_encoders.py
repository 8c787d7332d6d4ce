"""hen_fast.encoders: the interface (validation, conversion, batching), identity, the diffusers and
DALL-E wrappers on tiny random-init models, and the shipped autoencoders on real eval images."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from hen_fast import datasets, encoders
from hen_fast.encoders.diffusers_models import ModelNotFoundError
from hen_fast.encoders.shipped import (
    DEFAULT_TILES,
    WEIGHTS_DIR,
    autoencoder_config,
    shipped_info,
    shipped_present,
)

from helpers import randint, rel_err

TINY_DALLE = dict(vocab_size=16, width=8, init_channels=8, blocks_per_group=1)


def tiny_config(channels=3, size=28, **extra):
    """The shipped models' architecture (downsampling by 4, 4 latent channels) at tiny widths."""
    return autoencoder_config(channels, size, widths=(8, 8, 16), norm_groups=4, **extra)


def random_images(gen, n=None, channels=1, size=(28, 28)):
    n = randint(gen, 1, 7) if n is None else n
    return torch.rand(n, channels, *size, generator=gen)


@pytest.fixture(scope="module")
def tiny_kl():
    return encoders.load("diffusers-kl", config=tiny_config(), seed=1)


@pytest.fixture(scope="module")
def tiny_vq():
    return encoders.load("diffusers-vq", config=tiny_config(num_vq_embeddings=12), seed=2)


# ---------------------------------------------------------------------------------------------
# interface: validation, conversion, batching


def test_import_is_light():
    code = (
        "import sys, hen_fast.encoders as e; e.available(); "
        "heavy = {'diffusers', 'transformers', 'sentence_transformers', 'matplotlib'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_available_and_load_names():
    names = encoders.available()
    assert names[0] == "identity" and {"diffusers-kl", "diffusers-vq", "dalle"} <= set(names)
    with pytest.raises(ValueError, match="unknown encoder 'nope'"):
        encoders.load("nope")
    with pytest.raises(TypeError, match="name"):
        encoders.load(3)


@pytest.mark.parametrize(
    "images, error, match",
    [
        (torch.rand(1, 28, 28), ValueError, "rank 4.*images\\[None\\]"),
        (torch.rand(1, 1, 1, 28, 28), ValueError, "rank 4"),
        (torch.rand(2, 5, 28, 28), ValueError, "5 channels"),
        ((torch.rand(2, 1, 28, 28) * 255).to(torch.uint8), TypeError, "floating point.*255"),
        (torch.rand(2, 1, 28, 28) + 0.5, ValueError, r"values in \[0, 1\]"),
        (torch.rand(2, 1, 28, 28) - 0.5, ValueError, r"values in \[0, 1\]"),
        (torch.rand(2, 1, 28, 0), ValueError, "empty spatial size"),
        ([[0.5]], TypeError, "torch.Tensor"),
    ],
)
def test_encode_rejects_bad_images(images, error, match):
    encoder = encoders.load("identity")
    with pytest.raises(error, match=match):
        encoder.encode(images)
    with pytest.raises(error, match=match):
        encoder.prepare(images)


def test_encode_rejects_nan_anywhere(gen):
    images = random_images(gen, n=5)
    index = tuple(randint(gen, 0, s - 1) for s in images.shape)
    images[index] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        encoders.load("identity").encode(images)


def test_decode_and_batch_size_validation():
    encoder = encoders.load("identity", image_size=4, channels=1)
    with pytest.raises(ValueError, match=r"\(N, 16\)"):
        encoder.decode(torch.zeros(2, 15))
    with pytest.raises(ValueError, match=r"\(N, 16\)"):
        encoder.decode(torch.zeros(16))
    with pytest.raises(ValueError, match="NaN or Inf"):
        encoder.decode(torch.full((2, 16), float("nan")))
    with pytest.raises(TypeError, match="floating"):
        encoder.decode(torch.zeros(2, 16, dtype=torch.long))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="batch_size"):
            encoder.encode(torch.zeros(1, 1, 4, 4), batch_size=bad)
    for bad in ((0, 4), (4,), "4", 0):
        with pytest.raises(ValueError, match="image_size"):
            encoders.load("identity", image_size=bad)
    with pytest.raises(ValueError, match="channels"):
        encoders.load("identity", channels=2)


def test_identity_round_trip_is_exact(gen):
    size = (randint(gen, 3, 20), randint(gen, 3, 20))
    channels = (1, 3)[randint(gen, 0, 1)]
    encoder = encoders.load("identity", image_size=size, channels=channels)
    images = random_images(gen, channels=channels, size=size)
    latents = encoder.encode(images, batch_size=randint(gen, 1, 4))
    assert latents.shape == (images.shape[0], channels * size[0] * size[1])
    assert latents.dtype == torch.float32 and encoder.latent_dim == latents.shape[1]
    assert torch.equal(latents, images.flatten(1))
    assert torch.equal(encoder.decode(latents), images)
    assert encoder.encode(images[:0]).shape == (0, encoder.latent_dim)
    assert encoder.decode(latents[:0]).shape == (0, channels, *size)


def test_channel_conversion_by_hand(gen):
    rgb = random_images(gen, channels=3, size=(5, 6))
    grey = encoders.load("identity", image_size=(5, 6), channels=1).prepare(rgb)
    expected = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    torch.testing.assert_close(grey[:, 0], expected, rtol=0, atol=1e-6)
    to_rgb = encoders.load("identity", image_size=(5, 6), channels=3)
    assert torch.equal(to_rgb.prepare(grey), grey.expand(-1, 3, -1, -1))
    rgba = torch.cat([rgb, torch.rand(rgb.shape[0], 1, 5, 6, generator=gen)], dim=1)
    assert torch.equal(to_rgb.prepare(rgba), rgb)  # alpha dropped
    grey_alpha = torch.cat([grey, torch.zeros_like(grey)], dim=1)
    assert torch.equal(to_rgb.prepare(grey_alpha), grey.expand(-1, 3, -1, -1))


def test_resize_keeps_flat_images_and_range(gen):
    encoder = encoders.load("identity", image_size=(28, 28), channels=1)
    level = float(torch.rand(1, generator=gen))
    for size in ((56, 56), (13, 40), (28, 28)):
        flat = torch.full((2, 1, *size), level)
        prepared = encoder.prepare(flat)
        assert prepared.shape == (2, 1, 28, 28)
        torch.testing.assert_close(prepared, torch.full_like(prepared, level))
    big = random_images(gen, channels=1, size=(61, 47))
    prepared = encoder.prepare(big)
    assert prepared.shape[-2:] == (28, 28) and 0 <= prepared.min() and prepared.max() <= 1
    assert encoder.encode(big).shape == (big.shape[0], 784)
    # downsampling averages (antialiasing): a 1-pixel checkerboard at double size becomes flat
    # grey (away from the border, where the filter is cut off)
    checker = (torch.arange(56)[:, None] + torch.arange(56)[None, :]) % 2
    smoothed = encoder.prepare(checker.float()[None, None])[..., 1:-1, 1:-1]
    torch.testing.assert_close(smoothed, torch.full_like(smoothed, 0.5))


def test_batching_and_progress_bar_do_not_change_results(gen, tiny_kl, capsys):
    images = random_images(gen, n=randint(gen, 3, 5), channels=3)
    whole = tiny_kl.encode(images)
    batched = tiny_kl.encode(images, batch_size=randint(gen, 1, 2), progress=True)
    torch.testing.assert_close(batched, whole, rtol=1e-5, atol=1e-6)
    quiet = tiny_kl.decode(whole, batch_size=2, progress=False)
    shown = tiny_kl.decode(whole, batch_size=2, progress=True)
    torch.testing.assert_close(shown, quiet, rtol=1e-5, atol=1e-6)
    assert "encode (AutoencoderKL)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# diffusers AutoencoderKL and VQModel (tiny, random weights)


def test_kl_matches_diffusers_directly(gen, tiny_kl):
    images = random_images(gen, channels=3)
    latents = tiny_kl.encode(images)
    assert tiny_kl.latent_shape == (4, 7, 7) and latents.shape == (images.shape[0], 196)
    with torch.no_grad():
        direct = tiny_kl.model.encode(images * 2 - 1).latent_dist.mode().flatten(1)
        decoded = (tiny_kl.model.decode(direct.reshape(-1, 4, 7, 7)).sample + 1) / 2
    torch.testing.assert_close(latents, direct, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tiny_kl.decode(latents), decoded.clamp(0, 1), rtol=1e-5, atol=1e-6)
    grey = random_images(gen, channels=1, size=(40, 33))  # converted and resized
    assert tiny_kl.decode(tiny_kl.encode(grey)).shape == (grey.shape[0], 3, 28, 28)


def test_random_init_is_deterministic_per_seed(gen):
    images = random_images(gen, channels=3)
    first = encoders.load("diffusers-kl", config=tiny_config(), seed=5).encode(images)
    again = encoders.load("diffusers-kl", config=tiny_config(), seed=5).encode(images)
    other = encoders.load("diffusers-kl", config=tiny_config(), seed=6).encode(images)
    assert torch.equal(first, again) and not torch.allclose(first, other)


def test_vq_latent_kinds_agree(gen, tiny_vq):
    images = random_images(gen, channels=3)
    codes = tiny_vq.codes(images)
    assert codes.shape == (images.shape[0], 7, 7) and int(codes.max()) < 12
    quantized = tiny_vq.encode(images)
    table = tiny_vq.model.quantize.embedding.weight
    torch.testing.assert_close(
        quantized.reshape(-1, 4, 49), table[codes.flatten(1)].permute(0, 2, 1), rtol=0, atol=0
    )
    onehot = encoders.load(
        "diffusers-vq", config=tiny_config(num_vq_embeddings=12), seed=2, latent="onehot"
    )
    as_onehot = onehot.encode(images)
    assert as_onehot.shape == (images.shape[0], 49 * 12) and onehot.latent_dim == 49 * 12
    assert torch.equal(as_onehot.reshape(-1, 49, 12).argmax(2), codes.flatten(1))
    assert torch.equal(as_onehot.sum(1), torch.full((images.shape[0],), 49.0))
    # a dot product of one-hot latents counts the positions with equal codes
    matches = (codes.flatten(1)[:, None] == codes.flatten(1)[None]).sum(2).float()
    assert torch.equal(as_onehot @ as_onehot.T, matches)
    # both decode through the same codes; a recalled mixture decodes to its dominant codes
    torch.testing.assert_close(onehot.decode(as_onehot), tiny_vq.decode(quantized))
    with torch.no_grad():
        direct = (tiny_vq.model.decode(quantized.reshape(-1, 4, 7, 7)).sample + 1) / 2
    torch.testing.assert_close(tiny_vq.decode(quantized), direct.clamp(0, 1))
    nudged = quantized + 1e-4 * torch.randn(quantized.shape, generator=gen)
    torch.testing.assert_close(tiny_vq.decode(nudged), tiny_vq.decode(quantized))
    continuous = encoders.load(
        "diffusers-vq", config=tiny_config(num_vq_embeddings=12), seed=2, latent="continuous"
    )
    with torch.no_grad():
        before = tiny_vq.model.encode(images * 2 - 1).latents.flatten(1)
    torch.testing.assert_close(continuous.encode(images), before, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="latent must be one of"):
        encoders.load("diffusers-vq", config=tiny_config(), latent="codes")


def test_pretrained_folder_round_trip_and_missing_models(tmp_path, tiny_kl, monkeypatch):
    tiny_kl.model.save_pretrained(tmp_path / "kl")
    loaded = encoders.load("diffusers-kl", pretrained=tmp_path / "kl")
    images = torch.rand(3, 3, 28, 28)
    assert torch.equal(loaded.encode(images), tiny_kl.encode(images))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # belt and braces: local_files_only already
    with pytest.raises(ModelNotFoundError, match="never downloads"):
        encoders.load("diffusers-kl", pretrained=tmp_path / "empty-folder-missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no loadable AutoencoderKL"):
        encoders.load("diffusers-kl", pretrained=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="local Hugging Face cache"):
        encoders.load("diffusers-vq", pretrained="hen-fast-test/not-a-cached-model")
    with pytest.raises(ValueError, match="exactly one of"):
        encoders.load("diffusers-kl")
    with pytest.raises(ValueError, match="takes 3"):
        encoders.load("diffusers-kl", config=tiny_config(), channels=1)


# ---------------------------------------------------------------------------------------------
# DALL-E discrete VAE (tiny width, random weights)


def test_dalle_latents_and_decoder_path(gen):
    dalle = encoders.load("dalle", config=TINY_DALLE, image_size=16, seed=3)
    images = random_images(gen, channels=3, size=(16, 16))
    latents = dalle.encode(images)
    assert latents.shape == (images.shape[0], 4 * 16) and dalle.latent_dim == 64
    codes = dalle.codes(images)
    assert torch.equal(latents.reshape(-1, 4, 16).argmax(2), codes.flatten(1))
    # decoding = the full decoder on the one-hot code grid, logit-Laplace location unsqueezed
    with torch.no_grad():
        one_hot = torch.nn.functional.one_hot(codes, 16).permute(0, 3, 1, 2).float()
        stats = dalle.decoder_net(one_hot)
    expected = ((torch.sigmoid(stats[:, :3]) - 0.1) / 0.8).clamp(0, 1)
    decoded = dalle.decode(latents)
    torch.testing.assert_close(decoded, expected, rtol=1e-5, atol=1e-6)
    embedding = encoders.load("dalle", config=TINY_DALLE, image_size=16, seed=3, latent="embedding")
    assert embedding.latent_dim == 4 * 8
    torch.testing.assert_close(embedding.decode(embedding.encode(images)), decoded)
    # encoder: squeezed pixels through the network, argmax over the vocabulary
    with torch.no_grad():
        logits = dalle.encoder_net(0.8 * images + 0.1)
    assert torch.equal(codes, logits.argmax(1))


def test_dalle_weights_files(tmp_path, gen):
    from safetensors.torch import save_file

    dalle = encoders.load("dalle", config=TINY_DALLE, image_size=16, seed=4)
    images = random_images(gen, channels=3, size=(16, 16))
    save_file(dalle.state_dict(), str(tmp_path / "dvae.safetensors"))
    loaded = encoders.load("dalle", weights=tmp_path / "dvae.safetensors", image_size=16)
    assert loaded.config == {**encoders.dalle.DEFAULT_CONFIG, **TINY_DALLE}
    assert torch.equal(loaded.encode(images), dalle.encode(images))
    # the released layout: separate files, convolution parameters named w and b
    for part in ("encoder", "decoder"):
        state = {
            key[len(part) + 1 :].replace(".weight", ".w").replace(".bias", ".b"): value
            for key, value in dalle.state_dict().items()
            if key.startswith(part + ".")
        }
        torch.save(state, tmp_path / f"{part}.pt")
    released = encoders.load(
        "dalle",
        encoder_weights=tmp_path / "encoder.pt",
        decoder_weights=tmp_path / "decoder.pt",
        image_size=16,
    )
    latents = dalle.encode(images)
    assert torch.equal(released.encode(images), latents)
    assert torch.equal(released.decode(latents), dalle.decode(latents))
    torch.save(dalle.encoder_net, tmp_path / "pickled.pkl")
    with pytest.raises(ValueError, match="state dict"):
        encoders.load("dalle", weights=tmp_path / "pickled.pkl")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        encoders.load("dalle", weights=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="not both and not neither"):
        encoders.load("dalle")
    with pytest.raises(ValueError, match="multiple of 8"):
        encoders.load("dalle", config=TINY_DALLE, image_size=12)
    with pytest.raises(ValueError, match="unknown config keys"):
        encoders.load("dalle", config=dict(TINY_DALLE, depth=3))


# ---------------------------------------------------------------------------------------------
# the shipped autoencoders, for real

# Measured reconstruction MSE on the eval split (the json records it) with margin: a regression
# in loading, conversion or decoding shows as a far larger error.
SHIPPED_SHAPES = {
    "mnist-kl": (1, (28, 28), 196),
    "mnist-vq": (1, (28, 28), 196),
    "patches-kl": (3, (32, 32), 256),
    "patches-vq": (3, (32, 32), 256),
    "tiles-grey": (1, (32, 32), 16 * 16),  # 16 tiles of 8x8, 16 numbers each
    "tiles-rgb": (3, (32, 32), 16 * 16),
}


def eval_images(name: str, count: int) -> torch.Tensor:
    if name.startswith("mnist"):
        return datasets.mnist5k("eval")[0][:count]
    return datasets.natural_patches("eval", size=32, limit=count)


def test_shipped_weights_are_small_and_documented():
    files = list(WEIGHTS_DIR.glob("*.safetensors"))
    assert sum(f.stat().st_size for f in files) <= 10 * 2**20
    for name in encoders.SHIPPED:
        assert shipped_present(name), name
        assert name in encoders.available()
        info = shipped_info(name)
        for key in ("seed", "steps", "date", "torch", "data"):
            assert key in info["training"], (name, key)
        assert "'train'" in info["training"]["data"]
        assert info["eval"]["eval_images"] > 0 and info["recommended"]
        json.dumps(info)


@pytest.mark.parametrize("name", encoders.SHIPPED)
def test_shipped_models_reconstruct_eval_images(name):
    channels, size, latent_dim = SHIPPED_SHAPES[name]
    encoder = encoders.load(name)
    info = shipped_info(name)
    assert (encoder.channels, encoder.image_size, encoder.latent_dim) == (
        channels,
        size,
        latent_dim,
    )
    images = eval_images(name, 64)
    recon = encoder.decode(encoder.encode(images))
    mse = float((recon - encoder.prepare(images)).pow(2).mean())
    tiled = name in DEFAULT_TILES  # the tile models have one form, recorded as "recon_mse"
    key = "recon_mse" + ("_tiled" if tiled else "") + ("_quantized" * name.endswith("vq"))
    assert mse <= 2.0 * info["eval"][key] + 1e-3, (mse, info["eval"][key])
    # far better than the trivial reconstruction (each image's mean value)
    baseline = float((images - images.mean(dim=(1, 2, 3), keepdim=True)).pow(2).mean())
    assert mse < 0.5 * baseline, (mse, baseline)
    assert set(encoder.recommended) >= {"beta", "similarity", "separation", "steps"}
    assert torch.equal(encoder.encode(images[:5]), encoder.encode(images[:5]))  # deterministic


def test_shipped_vq_onehot_decodes_like_quantized():
    images = eval_images("mnist-vq", 16)
    quantized = encoders.load("mnist-vq")
    onehot = encoders.load("mnist-vq", latent="onehot")
    assert onehot.latent_dim == 49 * quantized.num_codes
    torch.testing.assert_close(
        onehot.decode(onehot.encode(images)), quantized.decode(quantized.encode(images))
    )
    assert onehot.recommended != {} and onehot.recommended is not quantized.recommended


# ---------------------------------------------------------------------------------------------
# latent masks of occluded cues (HEN's occlusion-aware recall)


def test_identity_latent_mask_is_the_known_pixels(gen):
    encoder = encoders.load("identity", image_size=(5, 7), channels=3)
    known = torch.rand(4, 5, 7, generator=gen) < 0.5
    mask = encoder.latent_mask(known)
    assert torch.equal(mask, known[:, None].expand(-1, 3, -1, -1).reshape(4, -1))
    with pytest.raises(ValueError, match=r"known must have shape \(N, 5, 7\)"):
        encoder.latent_mask(known[:, :4])
    with pytest.raises(TypeError, match="bool"):
        encoder.latent_mask(known.float())


@pytest.mark.parametrize("latent", ["kl", "quantized", "onehot", "continuous"])
def test_a_tiled_latent_mask_is_exact(gen, latent):
    """Whatever the hidden pixels hold, the masked coordinates of a tiled encoder's latents are
    the same; the other coordinates change (so the check can fail)."""
    options = {} if latent == "kl" else {"latent": latent}
    name, extra = "diffusers-kl", {}
    if latent != "kl":
        name, extra = "diffusers-vq", {"num_vq_embeddings": 12}
    encoder = encoders.load(name, config=tiny_config(size=32, **extra), seed=3, tile=8, **options)
    assert encoder.latent_shape[-2:] == (8, 8)
    images = random_images(gen, 5, channels=3, size=(32, 32))
    known = torch.ones(5, 32, 32, dtype=torch.bool)
    for row in range(5):  # a random box hidden in each image
        top, left = randint(gen, 0, 20), randint(gen, 0, 20)
        known[row, top : top + randint(gen, 5, 12), left : left + randint(gen, 5, 12)] = False
    other = torch.where(known[:, None], images, torch.rand(images.shape, generator=gen))
    mask = encoder.latent_mask(known)
    a, b = encoder.encode(images), encoder.encode(other)
    assert mask.any(1).all() and (~mask).any(1).all()
    assert rel_err(a[mask], b[mask], floor=1.0) < 1e-6
    if latent != "onehot":  # one-hot codes may happen to agree; continuous values do not
        assert bool(((a - b).abs() > 1e-4)[~mask].any())
    # the mask is per position: every latent channel (or code) of a position shares it
    h, w = encoder.latent_shape[-2:]
    per_position = mask.reshape(5, h * w, -1) if latent == "onehot" else mask.reshape(5, -1, h * w)
    axis = 2 if latent == "onehot" else 1
    assert torch.equal(per_position.all(axis), per_position.any(axis))


def test_an_untiled_latent_mask_keeps_the_positions_of_known_blocks(tiny_kl):
    known = torch.ones(2, 28, 28, dtype=torch.bool)
    known[0, 17:] = False  # rows 0..16 known: latent rows 0..3 have their 4-pixel blocks known
    known[1, :, :9] = False  # columns 9.. known: latent columns 3.. (pixels 12..)
    positions = tiny_kl.latent_mask(known).reshape(2, 4, 7, 7)[:, 0]
    expected = torch.zeros(2, 7, 7, dtype=torch.bool)
    expected[0, :4] = True
    expected[1, :, 3:] = True
    assert torch.equal(positions, expected)
    assert tiny_kl.tile is None


def test_tile_must_divide_the_image():
    config = tiny_config(size=32)
    with pytest.raises(ValueError, match="tile must be >= 1 and divide"):
        encoders.load("diffusers-kl", config=config, tile=5)
    with pytest.raises(TypeError, match="tile must be an int"):
        encoders.load("diffusers-kl", config=config, tile=8.0)
    assert encoders.load("patches-kl").tile == 16 and encoders.load("mnist-kl").tile is None
    assert encoders.load("patches-kl", tile=None).tile is None
