"""COCO-format caption loading on a tiny file the test writes."""

import json

import pytest
import torch
from PIL import Image

from hen_fast.captions import load_coco_captions


def write_coco(tmp_path, with_images=True):
    data = {
        "images": [
            {"id": 30, "file_name": "b.png"},
            {"id": 4, "file_name": "a.png"},
            {"id": 9, "file_name": "uncaptioned.png"},
        ],
        "annotations": [
            {"id": 1, "image_id": 4, "caption": "A red square. "},
            {"id": 2, "image_id": 30, "caption": "A blue square."},
            {"id": 3, "image_id": 4, "caption": "Something red."},
        ],
    }
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(data))
    if with_images:
        Image.new("RGB", (6, 4), (0, 0, 255)).save(tmp_path / "b.png")
        Image.new("RGB", (6, 4), (255, 0, 0)).save(tmp_path / "a.png")
    return path


def test_captions_follow_the_image_order(tmp_path):
    loaded = load_coco_captions(write_coco(tmp_path, with_images=False))
    assert loaded.file_names == ["b.png", "a.png"]  # the uncaptioned image is left out
    assert loaded.captions == [["A blue square."], ["A red square. ", "Something red."]]
    assert loaded.joined() == ["A blue square.", "A red square. Something red."]
    assert loaded.images is None and len(loaded) == 2
    assert load_coco_captions(write_coco(tmp_path, False), limit=1).file_names == ["b.png"]


def test_images_are_loaded_resized_and_converted(tmp_path):
    loaded = load_coco_captions(write_coco(tmp_path), image_dir=tmp_path)
    assert loaded.images.shape == (2, 3, 4, 6)
    assert torch.equal(loaded.images[0, :, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.equal(loaded.images[1, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    grey = load_coco_captions(write_coco(tmp_path), image_dir=tmp_path, size=8, channels=1)
    assert grey.images.shape == (2, 1, 8, 8)
    assert 0 <= grey.images.min() and grey.images.max() <= 1


def test_bad_caption_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_coco_captions(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_coco_captions(broken)
    broken.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="'annotations'"):
        load_coco_captions(broken)
    broken.write_text(
        json.dumps({"images": [{"id": 1, "file_name": "x"}], "annotations": [{"image_id": 2}]})
    )
    with pytest.raises(ValueError, match=r"annotations\[0\] needs"):
        load_coco_captions(broken)
    broken.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "x"}],
                "annotations": [{"image_id": 2, "caption": "c"}],
            }
        )
    )
    with pytest.raises(ValueError, match="image id 2"):
        load_coco_captions(broken)
    path = write_coco(tmp_path, with_images=False)
    with pytest.raises(ValueError, match="b.png"):
        load_coco_captions(path, image_dir=tmp_path / "nowhere")
