"""Offline data sets: shapes, ranges, fixed disjoint splits, cues."""

import pytest
import torch
from PIL import Image

from hen_fast import datasets


def test_mnist_splits_are_fixed_and_disjoint():
    images, labels = datasets.mnist5k()
    assert images.shape == (5000, 1, 28, 28) and labels.shape == (5000,)
    assert 0 <= images.min() and images.max() <= 1 and set(labels.tolist()) == set(range(10))
    train, eval_ = datasets.mnist5k("train")[0], datasets.mnist5k("eval")[0]
    assert train.shape[0] == 4000 and eval_.shape[0] == 1000
    assert torch.equal(eval_, images[4::5])
    eval_.zero_()  # callers get copies: the cached data is untouched
    assert torch.equal(datasets.mnist5k("eval")[0], images[4::5])


def test_digits_and_patches():
    digits, labels = datasets.digits("eval")
    assert digits.shape[1:] == (1, 8, 8) and digits.shape[0] == labels.shape[0] == 1797 // 5
    assert digits.max() <= 1
    train = datasets.natural_patches("train", size=16, limit=50)
    eval_ = datasets.natural_patches("eval", size=16)
    assert train.shape == (50, 3, 16, 16) and eval_.shape[1:] == (3, 16, 16)
    # eval patches come from other photos: no eval patch equals a training patch
    all_train = datasets.natural_patches("train", size=16).flatten(1)
    assert torch.cdist(eval_.flatten(1), all_train).min() > 0
    assert torch.equal(
        datasets.natural_patches("eval", size=16, seed=3),
        datasets.natural_patches("eval", size=16, seed=3),
    )
    with pytest.raises(ValueError, match="split"):
        datasets.digits("test")


def test_image_folder(tmp_path):
    for index in range(6):
        Image.new("RGB", (5, 4), (index * 40, 0, 0)).save(tmp_path / f"{index}.png")
    images = datasets.image_folder(tmp_path)
    assert images.shape == (6, 3, 4, 5)
    assert images[2, 0, 0, 0].item() == pytest.approx(80 / 255)
    assert datasets.image_folder(tmp_path, split="eval").shape[0] == 1  # index 4
    assert datasets.image_folder(tmp_path, size=8, channels=1).shape == (6, 1, 8, 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        datasets.image_folder(tmp_path / "empty")


def test_cues(gen):
    images = torch.rand(3, 1, 6, 4, generator=gen)
    cues, visible = datasets.mask_lower_half(images)
    assert torch.equal(cues[..., :3, :], images[..., :3, :]) and not cues[..., 3:, :].any()
    assert visible[..., :3, :].all() and not visible[..., 3:, :].any()
    cues, visible = datasets.mask_random(images, fraction=0.5, seed=1)
    assert torch.equal(cues, images * visible)
    noisy = datasets.add_noise(images, 0.5, seed=2)
    assert 0 <= noisy.min() and noisy.max() <= 1 and not torch.equal(noisy, images)
    assert torch.equal(noisy, datasets.add_noise(images, 0.5, seed=2))


def test_held_out_data():
    photos = datasets.heldout_photo_patches(size=32)
    assert photos.shape == (2 * 13 * 20, 3, 32, 32) and photos.dtype == torch.float32
    assert 0 <= float(photos.min()) and float(photos.max()) <= 1 and photos.std() > 0.05
    assert torch.equal(datasets.heldout_photo_patches(limit=7, seed=3),
                       datasets.heldout_photo_patches(seed=3)[:7])  # fmt: skip
    faces = datasets.faces()
    assert faces.shape == (200, 1, 25, 25) and 0 <= float(faces.min()) <= float(faces.max()) <= 1
    # neither overlaps the patches the shipped models trained or were tuned on
    train = datasets.natural_patches("all", size=32)
    assert not bool((torch.cdist(photos.flatten(1), train.flatten(1)) < 1e-3).any())


@pytest.mark.parametrize("fraction, hidden_rows", [(0.0, 0), (0.4, 4), (0.5, 5), (1.0, 10)])
def test_mask_lower_hides_whole_rows(fraction, hidden_rows):
    images = torch.rand(3, 2, 10, 6) + 0.5
    cues, visible = datasets.mask_lower(images, fraction)
    assert not visible[..., 10 - hidden_rows :, :].any()
    assert visible[..., : 10 - hidden_rows, :].all()
    assert torch.equal(cues, images * visible)
    with pytest.raises(ValueError, match="fraction"):
        datasets.mask_lower(images, 1.5)
