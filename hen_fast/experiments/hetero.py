"""``hen-fast hen-hetero``: recall images from captions (the paper's Table 5) and the
non-unique-association failure (Fig. 6).

The offline data has no captions, so each image gets a unique made-up one built from its label
and an index-coded word pair ("a handwritten seven drawn by the quiet otter"); similar wording
across captions keeps the text side from being trivially separable. Text is embedded by MiniLM
(sentence-transformers), by CLIP when local weights are given, or as a pixelised SHA-256 hash passed
through the image encoder. Beta is tuned on the smallest bank and held as the bank grows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..hen import HeteroAssociativeNetwork
from . import common

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ADJECTIVES = (
    "quiet",
    "brave",
    "small",
    "green",
    "sleepy",
    "loud",
    "gentle",
    "rapid",
    "golden",
    "silver",
    "hidden",
    "bright",
    "narrow",
    "wooden",
    "frozen",
    "hollow",
    "lucky",
    "spotted",
    "tired",
    "proud",
)
NOUNS = (
    "otter",
    "falcon",
    "teacher",
    "sailor",
    "lantern",
    "river",
    "badger",
    "painter",
    "clock",
    "garden",
    "violin",
    "monk",
    "harbor",
    "pepper",
    "comet",
    "tulip",
    "anchor",
    "cricket",
    "mirror",
    "ladder",
)


def make_captions(count: int, labels: torch.Tensor | None = None) -> list[str]:
    """A unique caption per image: the label word when known, then a word pair coded by index."""
    captions = []
    for index in range(count):
        adjective = ADJECTIVES[index % len(ADJECTIVES)]
        noun = NOUNS[(index // len(ADJECTIVES)) % len(NOUNS)]
        round_ = index // (len(ADJECTIVES) * len(NOUNS))
        what = "a picture" if labels is None else f"a handwritten {DIGIT_WORDS[int(labels[index])]}"
        suffix = f", series {round_}" if round_ else ""
        captions.append(f"{what} drawn by the {adjective} {noun}{suffix}")
    return captions


def add_commands(commands) -> None:
    parser = commands.add_parser(
        "hen-hetero", help="recall images by caption (Table 5) and the shared-caption failure"
    )
    parser.add_argument("--data", choices=("mnist", "patches"), default="mnist")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--encoders", nargs="+", default=None, help="default: identity + shipped")
    parser.add_argument(
        "--text",
        nargs="+",
        default=["minilm", "pixel-hash"],
        help="text encoders: minilm, pixel-hash, clip (needs --clip-path)",
    )
    parser.add_argument("--clip-path", default=None, help="a local CLIP model folder")
    parser.add_argument("--betas", type=float, nargs="+", default=[10.0, 40.0, 160.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/hen")
    parser.set_defaults(run=run_hetero, extra="hen")


def _text_encoder(name, encoder, args):
    from .. import encoders

    if name == "pixel-hash":
        return encoders.load_text("pixel-hash", image_encoder=encoder)
    if name == "clip":
        return encoders.load_text("clip", path=args.clip_path)
    return encoders.load_text(name)


def _labels(data: str, images: torch.Tensor, seed: int):
    if data != "mnist":
        return None
    from .. import datasets

    labels = datasets.mnist5k("eval")[1]
    order = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(seed))
    return labels[order[: images.shape[0]]]


def run_hetero(args) -> int:
    from tqdm import tqdm

    sizes = sorted(args.sizes)
    images = common.load_images(args.data, sizes[-1], args.seed)
    captions = make_captions(images.shape[0], _labels(args.data, images, args.seed))
    names = args.encoders or common.default_encoders(args.data)
    rows, skipped, grids, failures, failure_images = [], {}, [], [], []
    configs = [(e, t) for e in names for t in args.text]
    for encoder_name, text_name in tqdm(configs, desc="hen-hetero", file=sys.stderr, disable=None):
        encoder = common.load_encoder(encoder_name, images)
        try:
            text = _text_encoder(text_name, encoder, args)
        except (FileNotFoundError, ValueError, TypeError, ImportError) as error:
            skipped[f"{encoder_name}/{text_name}"] = str(error)
            continue
        reference = encoder.decode(encoder.encode(images, progress=False), progress=False)
        network = HeteroAssociativeNetwork(encoder, text, progress=False)
        network.store(images[: sizes[0]], captions[: sizes[0]])
        tuning = {}
        for beta in args.betas:
            network.beta = beta
            tuning[beta] = _measure(network, captions[: sizes[0]], reference[: sizes[0]])
        network.beta = max(tuning, key=lambda b: (tuning[b]["exact"], -tuning[b]["mse"]))
        for size in sizes:
            if size > len(network):
                network.store(images[len(network) : size], captions[len(network) : size])
            scores = _measure(network, captions[:size], reference[:size])
            rows.append(
                dict(
                    encoder=encoder_name,
                    text=text_name,
                    size=size,
                    beta=network.beta,
                    steps=network.steps,
                    **scores,
                )
            )
        grids.append((f"{encoder_name}/{text_name}", network.recall(captions[:10])))
        failure, pictures = _shared_caption(
            encoder_name, text_name, encoder, text, images, captions, reference, network.beta
        )
        failures.append(failure)
        failure_images.append(pictures)
    out = Path(args.out)
    name = f"hetero-{args.data}"
    for r in rows:
        print(
            f"{r['encoder']:12s} {r['text']:10s} M={r['size']:5d} beta={r['beta']:<6g} "
            f"MSE {r['mse']:.4f}  1-SSIM {r['one_minus_ssim']:.4f}  exact {r['exact']:.3f}"
        )
    for f in failures:
        print(
            f"shared caption, {f['encoder']}/{f['text']}: MSE to image A {f['mse_a']:.4f}, "
            f"B {f['mse_b']:.4f}, their mean {f['mse_mean']:.4f}; after one update: A "
            f"{f['mse_a_1step']:.4f}, B {f['mse_b_1step']:.4f}, mean {f['mse_mean_1step']:.4f}"
        )
    for config, reason in skipped.items():
        print(f"skipped {config}: {reason}")
    record = {
        "data": args.data,
        "captions_example": captions[:3],
        "rows": rows,
        "shared_caption": failures,
        "skipped": skipped,
    }
    print(f"wrote {common.write_json(out, name, record)}")
    if grids:
        truth = common.load_encoder(names[0], images).prepare(images[:10])
        picture = common.image_grid(
            [truth] + [g for _, g in grids], ["stored"] + [label for label, _ in grids]
        )
        picture.save(out / f"{name}.png")
        print(f"wrote {out / f'{name}.png'}")
        _plot_failures(failures, failure_images, out / f"shared-caption-{args.data}.png")
    return 0


def _measure(network, captions, reference) -> dict:
    (recalled, indices), seconds = common.timed(network.recall_with_indices, captions)
    return {**common.recall_scores(recalled, indices, reference), "seconds": seconds}


def _shared_caption(encoder_name, text_name, encoder, text, images, captions, reference, beta):
    """Fig. 6: images A and B stored with one caption; what does that caption recall?"""
    count = min(100, images.shape[0])
    shared = list(captions[:count])
    shared[1] = shared[0]
    network = HeteroAssociativeNetwork(encoder, text, beta=beta, progress=False)
    network.store(images[:count], shared)
    pair = reference[:2]
    record = {"encoder": encoder_name, "text": text_name}
    recalls = []
    # One update lands on the mixture the shared caption points to; more updates let the image
    # part pull the state to whichever image the mixture is nearer.
    for steps, suffix in ((network.steps, ""), (1, "_1step")):
        network.steps = steps
        recalled = network.recall([shared[0]])[0]
        recalls.append(recalled)
        for key, target in (("a", pair[0]), ("b", pair[1]), ("mean", pair.mean(0))):
            record[f"mse_{key}{suffix}"] = float(((recalled - target) ** 2).mean())
    return record, torch.stack([pair[0], pair[1], *recalls])


def _plot_failures(failures, rows, path: Path) -> None:
    labels = [f"{f['encoder']}/{f['text']}" for f in failures]
    channels = max(r.shape[1] for r in rows)
    rows = [r.expand(-1, channels, -1, -1) for r in rows]
    same_size = all(r.shape == rows[0].shape for r in rows)
    if same_size:
        common.image_grid(rows, labels, columns=4, scale=3).save(path)
        print(
            f"wrote {path} (columns: image A, image B, recall from their shared caption, the "
            "same after one update)"
        )
