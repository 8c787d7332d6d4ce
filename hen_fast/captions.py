"""COCO-format caption files: which captions belong to which image.

A caption file is the JSON of COCO's ``captions_*.json``::

    {"images": [{"id": 7, "file_name": "000007.jpg", ...}, ...],
     "annotations": [{"image_id": 7, "caption": "A dog on a sofa."}, ...]}

Images come back in file order of ``"images"``, each with its captions in file order. Images
without any caption are left out (they cannot be recalled by caption).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ._extras import require


@dataclass(frozen=True)
class CaptionedImages:
    """``file_names[i]`` has ``captions[i]`` (one or more strings); ``images`` is ``(N, C, H, W)``
    in [0, 1] when the loader was given an image folder, else None."""

    file_names: list[str]
    captions: list[list[str]]
    images: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.file_names)

    def joined(self, separator: str = " ") -> list[str]:
        """One string per image: its captions joined (the HEN paper encodes all of an image's
        captions as one long sentence)."""
        return [separator.join(c.strip() for c in captions) for captions in self.captions]


def load_coco_captions(
    path: str | Path,
    image_dir: str | Path | None = None,
    size: int | tuple[int, int] | None = None,
    channels: int | None = None,
    limit: int | None = None,
) -> CaptionedImages:
    """Read a COCO-format caption file; with ``image_dir`` also load the images (resized to
    ``size`` and converted to ``channels`` like :func:`hen_fast.datasets.image_folder`).
    ``limit`` keeps the first that many captioned images.

    Raises:
        ValueError: the file is missing, is not JSON, lacks ``images``/``annotations`` or their
            fields, has a caption for an unknown image id or a non-string caption, or an image
            file is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"caption file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"caption file {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict) or not {"images", "annotations"} <= data.keys():
        raise ValueError(f"caption file {path} must be an object with 'images' and 'annotations'")
    names: dict[int, str] = {}
    for index, entry in enumerate(data["images"]):
        if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
            raise ValueError(f"{path}: images[{index}] needs 'id' and 'file_name'")
        names[entry["id"]] = str(entry["file_name"])
    captions: dict[int, list[str]] = {image_id: [] for image_id in names}
    for index, entry in enumerate(data["annotations"]):
        if not isinstance(entry, dict) or "image_id" not in entry or "caption" not in entry:
            raise ValueError(f"{path}: annotations[{index}] needs 'image_id' and 'caption'")
        if entry["image_id"] not in names:
            raise ValueError(
                f"{path}: annotations[{index}] refers to image id {entry['image_id']!r}, which "
                "is not in 'images'"
            )
        if not isinstance(entry["caption"], str):
            raise ValueError(f"{path}: annotations[{index}]['caption'] must be a string")
        captions[entry["image_id"]].append(entry["caption"])
    kept = [image_id for image_id in names if captions[image_id]][:limit]
    file_names = [names[image_id] for image_id in kept]
    images = None
    if image_dir is not None:
        images = _load_images(Path(image_dir), file_names, size, channels)
    return CaptionedImages(file_names, [captions[image_id] for image_id in kept], images)


def _load_images(folder: Path, file_names, size, channels) -> torch.Tensor:
    Image = require("PIL.Image", "hen")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if isinstance(size, int):
        size = (size, size)
    arrays = []
    for name in file_names:
        file = folder / name
        if not file.is_file():
            raise ValueError(f"image {file} named in the caption file does not exist")
        with Image.open(file) as image:
            mode = {1: "L", 3: "RGB", None: "RGB"}[channels]
            image = image.convert(mode)
            if size is not None:
                image = image.resize((size[1], size[0]), Image.BICUBIC)
            array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
            array = array.reshape(image.height, image.width, len(mode)).permute(2, 0, 1)
        if arrays and array.shape != arrays[0].shape:
            raise ValueError(f"{name} is {tuple(array.shape[1:])}: pass size= to resize them all")
        arrays.append(array)
    if not arrays:
        return torch.empty(0, channels or 3, *(size or (0, 0)))
    return torch.stack(arrays).float().div_(255.0)
