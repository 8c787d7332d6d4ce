"""Train the small autoencoders hen_fast ships, and measure the retrieval setting each recalls best
with.

    nice -n 10 python scripts/train_autoencoders.py                 # train all four, then --tune
    python scripts/train_autoencoders.py --models mnist-vq --steps 300
    python scripts/train_autoencoders.py --tune                      # re-measure recommended only
    python scripts/train_autoencoders.py --evaluate                  # re-measure reconstructions

Models (diffusers classes, 3 blocks of (16, 32, 32) channels, 4 latent channels, downsampling by
4): ``mnist-kl`` / ``mnist-vq`` on the train split of MNIST 5k (1x28x28 -> 4x7x7 latents) and
``patches-kl`` / ``patches-vq`` on natural-image patches of the training photos (3x32x32 -> 4x8x8).
Each writes ``hen_fast/encoders/weights/<name>.safetensors`` and ``<name>.json``: config, training
set-up (seed, steps, batch size, learning rate, date, versions) and the reconstruction MSE on the
disjoint eval split. ``--tune`` stores the eval split in a Hopfield network, recalls it from
occluded cues (scored on every latent, and on the latent mask of the known pixels) and noisy cues
over a grid of (similarity, beta, steps), and records the setting with the
best exact recall in each json's ``recommended`` (and prints the one for raw pixels).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import hen_fast
from hen_fast import datasets, encoders
from hen_fast.encoders.shipped import DEFAULT_TILES, WEIGHTS_DIR, autoencoder_config

MODELS = {
    "mnist-kl": ("mnist", "AutoencoderKL"),
    "mnist-vq": ("mnist", "VQModel"),
    "patches-kl": ("patches", "AutoencoderKL"),
    "patches-vq": ("patches", "VQModel"),
    "tiles-grey": ("photos-grey", "TileAutoencoder"),
    "tiles-rgb": ("photos-rgb", "TileAutoencoder"),
}
DATA_SHAPES = {"mnist": (1, 28), "patches": (3, 32), "photos-grey": (1, 32), "photos-rgb": (3, 32)}
GENERAL = ("photos-grey", "photos-rgb")  # general-purpose: random crops of every training photo
TILE = 8
TILE_HIDDEN = 384
# The stored latent's size per 8x8 tile, chosen by recall on the validation photos (--tune).
CODE_DIMS = {"photos-grey": (8, 16, 32), "photos-rgb": (16, 32, 48)}
GRADIENT_CLIP = 1.0
TILE_POOL = 200_000  # random training tiles drawn once; each step augments a batch of them
GENERAL_SOURCE = (
    "{pool} random 8x8 tiles of hen_fast.datasets.training_photos({channels}, 'train') at scales "
    "1, 1/2, 1/4 (every position equally likely), each batch flipped, turned and "
    "brightness/contrast-jittered; every tile is also encoded with Gaussian noise (sigma uniform "
    "in [0, {noise}]) and trained to decode the clean tile"
)
DATA_SOURCES = {
    "mnist": "hen_fast.datasets.mnist5k('train')",
    "patches": "hen_fast.datasets.natural_patches('train', size=32, stride=16), random flips",
}
SCALES = (1.0, 0.5, 0.25)
TRAIN_NOISE = 0.3  # the noisy half's largest sigma (the cues HEN is measured on use 0.2)
CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
CHECKPOINT_EVERY = 100  # steps; a stopped run resumes from the last one
CANDIDATE_DIR = CHECKPOINT_DIR / "candidates"  # the tile models' code-size candidates
NUM_CODES = 128  # per-position codebook of the VQ models: one-hot latents of 49 or 64 x 128
KL_WEIGHT = 1e-6  # small, as for latent-diffusion autoencoders: reconstruction first
DEAD_CODE_WINDOW = 50  # steps; codes unused for that long restart at a random encoder output
EXACT_LATENT_ERROR = 0.05  # a recall is exact when its latent is this close (relative) to the truth
BETA_GRID = [10.0**e for e in torch.arange(-2.0, 5.01, 0.5).tolist()]
TUNE_IMAGES = 300  # eval images stored when measuring the recommended settings (CPU time)
STEPS_GRID = (1, 3)


def model_config(dataset: str, model_class: str) -> dict:
    channels, size = DATA_SHAPES[dataset]
    vq = dict(num_vq_embeddings=NUM_CODES, vq_embed_dim=4) if model_class == "VQModel" else {}
    return autoencoder_config(channels, size, **vq)


def training_images(dataset: str, split: str) -> torch.Tensor:
    if dataset == "mnist":
        return datasets.mnist5k(split)[0]
    if dataset in GENERAL:  # eval: the validation photos (coffee, chelsea), never trained on
        return datasets.photo_patches(DATA_SHAPES[dataset][0], "eval", size=32)
    # Overlapping patches (half-patch stride) give the small training photos set 4x the crops.
    stride = 16 if split == "train" else None
    return datasets.natural_patches(split, size=32, stride=stride)


def restart_dead_codes(model, usage: torch.Tensor, latents: torch.Tensor, generator) -> int:
    """Codes no position chose in the last window move to random current encoder outputs, so
    short training still uses the whole codebook."""
    dead = (usage == 0).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    flat = latents.detach().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    picks = torch.randint(0, flat.shape[0], (dead.numel(),), generator=generator)
    model.quantize.embedding.weight.data[dead] = flat[picks]
    return int(dead.numel())


class CropSampler:
    """Random crops of every training photo at several scales (``crops``), and their
    augmentation (``augment``: flips, quarter turns, brightness and contrast)."""

    def __init__(self, channels: int, size: int, generator: torch.Generator):
        self.size, self.generator = size, generator
        self.photos = []
        for photo in datasets.training_photos(channels, "train"):
            for scale in SCALES:
                height, width = (round(side * scale) for side in photo.shape[1:])
                if min(height, width) < size:
                    continue
                scaled = F.interpolate(
                    photo[None], size=(height, width), mode="bilinear", antialias=True
                )[0].clamp_(0, 1)  # fmt: skip
                self.photos.append(scaled)
        # Each scaled photo is drawn in proportion to its area: every crop position equally.
        self.weights = torch.tensor([float(p[0].numel()) for p in self.photos])

    def crops(self, count: int) -> torch.Tensor:
        g, size = self.generator, self.size
        picks = torch.multinomial(self.weights, count, replacement=True, generator=g)
        crops = []
        for pick in picks.tolist():
            photo = self.photos[pick]
            top = int(torch.randint(0, photo.shape[1] - size + 1, (), generator=g))
            left = int(torch.randint(0, photo.shape[2] - size + 1, (), generator=g))
            crops.append(photo[:, top : top + size, left : left + size])
        return torch.stack(crops)

    def augment(self, batch: torch.Tensor) -> torch.Tensor:
        g, count = self.generator, batch.shape[0]
        flip = torch.rand(count, generator=g) < 0.5
        batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
        turns = int(torch.randint(0, 4, (), generator=g))  # one quarter-turn count per batch
        batch = torch.rot90(batch, turns, dims=(2, 3))
        contrast = 0.7 + 0.6 * torch.rand(count, 1, 1, 1, generator=g)
        brightness = 0.3 * (torch.rand(count, 1, 1, 1, generator=g) - 0.5)
        mean = batch.mean(dim=(1, 2, 3), keepdim=True)
        return ((batch - mean) * contrast + mean + brightness).clamp_(0, 1)


def tile_loss(model, batch: torch.Tensor, generator) -> tuple[torch.Tensor, dict]:
    """The tile models' objective: reconstruct each clean tile from its own code and from the
    code of a noisy copy (a denoising autoencoder).

    (Also pulling the noisy copy's code onto the clean one, relative to each code coordinate's
    spread, was tried: at weight 0.1 it cut nearest-code recall of sigma-0.2 validation cues from
    92.4% to 83.9% and raised the reconstruction MSE five-fold, so it is not used.)"""
    target = batch * 2 - 1
    sigma = TRAIN_NOISE * torch.rand(batch.shape[0], 1, 1, 1, generator=generator)
    noise = torch.randn(batch.shape, generator=generator)
    noisy = (batch + sigma * noise).clamp(0, 1) * 2 - 1
    recon = model.decode(model.encode(torch.cat([target, noisy])))
    clean_error, noisy_error = (recon - torch.cat([target, target])).pow(2).chunk(2)
    loss = (clean_error.mean() + noisy_error.mean()) / 2
    return loss, {"clean": clean_error.mean().item(), "noisy": noisy_error.mean().item()}


def build_model(name: str, code_dim: int | None):
    dataset, model_class = MODELS[name]
    if model_class == "TileAutoencoder":
        from hen_fast.encoders.tiles import TileAutoencoder

        channels = DATA_SHAPES[dataset][0]
        model = TileAutoencoder(channels, TILE, code_dim, TILE_HIDDEN)
        return model, model.config()
    import diffusers

    config = model_config(dataset, model_class)
    return getattr(diffusers, model_class)(**config), config


def train(
    name: str, steps: int, batch_size: int, lr: float, seed: int, fresh=False,
    code_dim: int | None = None, out_dir: Path = WEIGHTS_DIR,
) -> dict:  # fmt: skip
    """Train ``name``, saving a checkpoint every CHECKPOINT_EVERY steps under CHECKPOINT_DIR: a
    run stopped at any point (a working session's end) resumes where it was with the same
    arguments, unless ``fresh``. A tile model (``code_dim`` its code size) is written to
    ``out_dir`` as ``<name>-c<code_dim>``: a candidate ``main`` chooses among."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    dataset, model_class = MODELS[name]
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model, config = build_model(name, code_dim)
    general = dataset in GENERAL
    file_name = f"{name}-c{code_dim}" if general else name
    if general:
        sampler = CropSampler(DATA_SHAPES[dataset][0], TILE, generator)
        pool = sampler.crops(TILE_POOL)
    train_images = None if general else training_images(dataset, "train")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    usage = torch.zeros(NUM_CODES)
    restarted, first, elapsed = 0, 0, 0.0
    arguments = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, config=config)
    checkpoint_path = CHECKPOINT_DIR / f"{file_name}.pt"
    if checkpoint_path.is_file() and not fresh:
        checkpoint = torch.load(checkpoint_path, weights_only=False)
        if checkpoint["arguments"] == arguments:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            schedule.load_state_dict(checkpoint["schedule"])
            generator.set_state(checkpoint["generator"])
            torch.set_rng_state(checkpoint["torch_rng"])
            usage, restarted = checkpoint["usage"], checkpoint["restarted"]
            first, elapsed = checkpoint["step"], checkpoint["seconds"]
            print(f"{name}: resuming at step {first} of {steps}", flush=True)
        else:
            print(f"{name}: {checkpoint_path} is of other arguments; starting afresh", flush=True)
    started = time.perf_counter() - elapsed
    model.train()
    bar = tqdm(range(first, steps), desc=f"train {name}", disable=None, initial=first, total=steps)
    for step in bar:
        if general:
            index = torch.randint(0, pool.shape[0], (batch_size,), generator=generator)
            loss, parts = tile_loss(model, sampler.augment(pool[index]), generator)
        else:
            index = torch.randint(0, train_images.shape[0], (batch_size,), generator=generator)
            batch = train_images[index]
            if dataset == "patches":  # photos have no preferred left/right
                # (Random colour-channel orders, tried against the tint the training photos' reds
                # give eval reconstructions, raised the eval MSE from 0.007 to 0.019 at 800 steps.)
                flip = torch.rand(batch_size, generator=generator) < 0.5
                batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
            target = batch * 2 - 1
            parts = {}
            if model_class == "AutoencoderKL":
                posterior = model.encode(target).latent_dist
                recon = model.decode(posterior.sample(generator=None)).sample
                loss = F.mse_loss(recon, target) + KL_WEIGHT * posterior.kl().mean()
            else:
                latents = model.encode(target).latents
                quantized, commit_loss, (_, _, codes) = model.quantize(latents)
                recon = model.decode(quantized, force_not_quantize=True).sample
                loss = F.mse_loss(recon, target) + commit_loss
                usage += torch.bincount(codes.flatten(), minlength=NUM_CODES).float()
                if (step + 1) % DEAD_CODE_WINDOW == 0 and step < 0.8 * steps:
                    restarted += restart_dead_codes(model, usage, latents, generator)
                    usage.zero_()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if general:  # the tile MLPs spiked (eval MSE 0.02 -> 0.17 between steps) without it
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRADIENT_CLIP)
        optimizer.step()
        schedule.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", **{k: f"{v:.4f}" for k, v in parts.items()})
        if bar.disable and step % 100 == 0:  # a log file gets a line now and then instead
            print(f"{name} step {step} loss {loss.item():.4f} {parts}", flush=True)
        if (step + 1) % CHECKPOINT_EVERY == 0 and step + 1 < steps:
            CHECKPOINT_DIR.mkdir(parents=True, exist_ok=True)
            state = dict(
                arguments=arguments, model=model.state_dict(), optimizer=optimizer.state_dict(),
                schedule=schedule.state_dict(), generator=generator.get_state(),
                torch_rng=torch.get_rng_state(), usage=usage, restarted=restarted,
                step=step + 1, seconds=time.perf_counter() - started,
            )  # fmt: skip
            torch.save(state, checkpoint_path.with_suffix(".tmp"))
            checkpoint_path.with_suffix(".tmp").replace(checkpoint_path)  # never half-written
    seconds = time.perf_counter() - started
    model.eval()

    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = out_dir / f"{file_name}.safetensors"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights_path))
    checkpoint_path.unlink(missing_ok=True)  # done: a later run trains afresh
    channels, size = DATA_SHAPES[dataset]
    record = {
        "name": file_name,
        "class": model_class,
        "config": config,
        "image_size": [size, size],
        "channels": channels,
        "training": {
            **({"tile": TILE, "hidden": TILE_HIDDEN, "code_dim": code_dim} if general else {}),
            "data": DATA_SOURCES.get(dataset)
            or GENERAL_SOURCE.format(channels=channels, noise=TRAIN_NOISE, pool=TILE_POOL),
            "train_images": (
                f"{len(sampler.photos)} scaled photos, {int(sampler.weights.sum())} pixels"
                if general
                else int(train_images.shape[0])
            ),
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "schedule": "one-cycle AdamW"
            + (f", gradient norm clipped at {GRADIENT_CLIP}" if general else ""),
            "loss": "MSE on [-1, 1] pixels"
            + (" of clean tiles from clean and noisy inputs" if general else "")
            + {"AutoencoderKL": f" + {KL_WEIGHT} * KL", "VQModel": " + VQ commitment"}.get(
                model_class, ""
            )
            + (
                f"; unused codes restarted every {DEAD_CODE_WINDOW} steps"
                if model_class == "VQModel"
                else ""
            ),
            "dead_codes_restarted": restarted if model_class == "VQModel" else None,
            "seed": seed,
            "seconds": round(seconds, 1),
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "diffusers": None if general else importlib.metadata.version("diffusers"),
            "python": platform.python_version(),
            "parameters": sum(p.numel() for p in model.parameters()),
        },
    }
    record_path = out_dir / f"{file_name}.json"
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    record["eval"] = evaluate(name, out_dir / file_name if general else None)
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def load_tile_model(stem: Path):
    """A trained tile model from ``<stem>.safetensors`` and ``<stem>.json`` (a candidate)."""
    from hen_fast.encoders.tiles import load_tile_encoder

    record = json.loads(stem.with_suffix(".json").read_text())
    return load_tile_encoder(record, stem.with_suffix(".safetensors"))


def evaluate(name: str, tile_stem: Path | None = None) -> dict:
    """Reconstruction MSE (pixels in [0, 1]) on the whole eval split, for each latent kind: whole
    images (as trained), and tiled (``recon_mse_tiled...``) for a model that encodes in tiles by
    default (hen_fast.encoders.shipped.DEFAULT_TILES). A tile model: the one at ``tile_stem``."""
    dataset, model_class = MODELS[name]
    images = training_images(dataset, "eval")
    if model_class == "TileAutoencoder":
        encoder = load_tile_model(tile_stem) if tile_stem else encoders.load(name)
        per_image = (encoder.decode(encoder.encode(images)) - encoder.prepare(images)).pow(2)
        per_image = per_image.flatten(1).mean(1)
        return {"eval_images": int(images.shape[0]), "recon_mse": float(per_image.mean()),
                "recon_mse_worst": float(per_image.max()), "latent_dim": encoder.latent_dim}
    kinds = ("quantized", "onehot") if model_class == "VQModel" else (None,)
    result = {"eval_images": int(images.shape[0])}
    tiles = {"": None, "_tiled": DEFAULT_TILES.get(name)}
    for kind in kinds:
        for suffix, tile in tiles.items():
            if suffix and tile is None:
                continue
            encoder = encoders.load(name, tile=tile, **({"latent": kind} if kind else {}))
            recon = encoder.decode(encoder.encode(images))
            per_image = (recon - encoder.prepare(images)).pow(2).flatten(1).mean(1)
            key = f"recon_mse{suffix}{'_' + kind if kind else ''}"
            result[key] = float(per_image.mean())
            result[key.replace("mse", "mse_worst")] = float(per_image.max())
        result["latent_dim" + ("_" + kind if kind else "")] = encoder.latent_dim
    if tiles["_tiled"] is not None:
        result["tile"] = tiles["_tiled"]
    return result


def cues(encoder, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Each kind of cue with the latent score mask it is recalled with (None: unmasked): the
    lower half hidden, without and with ``known`` (HEN's occlusion-aware recall), and noise."""
    occluded, known = datasets.mask_lower_half(images)
    known_pixels = encoder.prepare(known.float()).amin(1) >= 1.0
    return {
        "lower_half_occluded": (occluded, None),
        "lower_half_known": (occluded, encoder.latent_mask(known_pixels)),
        "noise_0.2": (datasets.add_noise(images, 0.2, seed=1), None),
    }


def exact_recall(encoder, images: torch.Tensor) -> list[dict]:
    """Store ``images``' latents, recall them from each kind of cue for every setting of the grid;
    a recall counts as exact when its latent is within EXACT_LATENT_ERROR (relative) of the
    truth's."""
    memories = encoder.encode(images)
    truth_norm = memories.norm(dim=1).clamp(min=1e-12)
    rows = []
    for cue_name, (cue, score_mask) in cues(encoder, images).items():
        queries = encoder.encode(cue)
        for similarity in ("dot", "l2"):
            for steps in STEPS_GRID:
                for beta in BETA_GRID:
                    recalled = hen_fast.retrieve(
                        queries, memories, beta=beta, similarity=similarity, steps=steps,
                        score_mask=score_mask,
                    )  # fmt: skip
                    error = (recalled - memories).norm(dim=1) / truth_norm
                    rows.append(
                        dict(
                            cue=cue_name,
                            similarity=similarity,
                            steps=steps,
                            beta=beta,
                            exact=float((error <= EXACT_LATENT_ERROR).float().mean()),
                        )
                    )
    return rows


def best_setting(rows: list[dict]) -> tuple[dict, float]:
    """The (similarity, steps, beta) with the best exact recall averaged over the cue kinds, as
    ``retrieve`` keyword arguments, and that recall. Among settings within 0.5 points of the best:
    the fewest steps, then l2, then the smallest beta (just large enough keeps the most room
    before scores saturate)."""
    scores: dict[tuple, list[float]] = {}
    for row in rows:
        scores.setdefault((row["similarity"], row["steps"], row["beta"]), []).append(row["exact"])
    means = {key: sum(v) / len(v) for key, v in scores.items()}
    best = max(means.values())
    near = [key for key, value in means.items() if value >= best - 0.005]
    similarity, steps, beta = min(near, key=lambda k: (k[1], k[0] != "l2", k[2]))
    setting = {
        "beta": float(f"{beta:.4g}"),
        "similarity": similarity,
        "separation": "softmax",
        "steps": steps,
    }
    return setting, round(means[(similarity, steps, beta)], 4)


def choose_tile_model(name: str, args) -> dict:
    """Train one candidate per code size in CODE_DIMS, measure each one's best exact recall on
    the validation photos (``exact_recall`` over the tune grid: occluded with and without the
    latent mask, noisy) and ship the best: the stored latent is chosen by measurement on data
    the models never trained on."""
    import shutil

    dataset, _ = MODELS[name]
    images = training_images(dataset, "eval")[:TUNE_IMAGES]
    candidates = {}
    for code_dim in CODE_DIMS[dataset]:
        train(name, args.steps, args.batch_size, args.lr, args.seed, args.fresh, code_dim,
              CANDIDATE_DIR)  # fmt: skip
        stem = CANDIDATE_DIR / f"{name}-c{code_dim}"
        setting, recall = best_setting(exact_recall(load_tile_model(stem), images))
        candidates[code_dim] = dict(exact_recall=recall, setting=setting)
        print(f"{name} code_dim {code_dim}: {setting} exact recall {recall}", flush=True)
    best = max(candidates, key=lambda c: (candidates[c]["exact_recall"], -c))
    stem = CANDIDATE_DIR / f"{name}-c{best}"
    shutil.copyfile(stem.with_suffix(".safetensors"), WEIGHTS_DIR / f"{name}.safetensors")
    record = json.loads(stem.with_suffix(".json").read_text())
    record["name"] = name
    record["code_dim_candidates"] = {
        str(c): v["exact_recall"] for c, v in candidates.items()
    }  # fmt: skip
    record["code_dim_chosen_on"] = (
        f"best exact recall over the tune grid, {images.shape[0]} validation patches "
        f"({', '.join(datasets.EVAL_PHOTOS)}), never trained on"
    )
    (WEIGHTS_DIR / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def tune(names: list[str]) -> None:
    for name in names:
        dataset, model_class = MODELS[name]
        images = training_images(dataset, "eval")[:TUNE_IMAGES]
        record_path = WEIGHTS_DIR / f"{name}.json"
        record = json.loads(record_path.read_text())
        kinds = {"VQModel": ("quantized", "onehot"), "TileAutoencoder": ("code",)}.get(
            model_class, ("kl",)
        )
        record["recommended"], record["recommended_exact_recall"] = {}, {}
        for kind in kinds:
            options = {"latent": kind} if model_class == "VQModel" else {}
            setting, recall = best_setting(exact_recall(encoders.load(name, **options), images))
            record["recommended"][kind] = setting
            record["recommended_exact_recall"][kind] = recall
            print(name, kind, setting, "exact recall", recall, flush=True)
        record["recommended_measured_on"] = (
            f"{images.shape[0]} eval images stored, recalled from lower-half-occluded cues "
            f"(scored on every latent and on the latent mask of the known pixels) and noise-0.2 "
            f"cues; exact = recalled latent within {EXACT_LATENT_ERROR} relative error; "
            f"grid: similarity dot/l2, steps {STEPS_GRID}, beta 10^-2..10^5 by half decades"
        )
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    for dataset in ("mnist", "patches"):
        images = training_images(dataset, "eval")[:TUNE_IMAGES]
        channels, size = DATA_SHAPES[dataset]
        identity = encoders.load("identity", image_size=size, channels=channels)
        setting, recall = best_setting(exact_recall(identity, images))
        print(f"identity ({dataset})", setting, "exact recall", recall, flush=True)


def reconstruction_figure(path: Path, count: int = 8) -> None:
    """A PNG grid: for each shipped model, eval images (top) over their reconstructions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(MODELS)
    figure, axes = plt.subplots(2 * len(names), count, figsize=(count, 2 * len(names) + 0.5))
    for row, name in enumerate(names):
        dataset, _ = MODELS[name]
        encoder = encoders.load(name)
        evaluation = training_images(dataset, "eval")
        spread = torch.linspace(0, evaluation.shape[0] - 1, count).long()  # MNIST is by label
        images = encoder.prepare(evaluation[spread])
        recon = encoder.decode(encoder.encode(images))
        mse = float((recon - images).pow(2).mean())
        for column in range(count):
            for offset, picture in enumerate((images, recon)):
                axis = axes[2 * row + offset, column]
                shown = picture[column].permute(1, 2, 0).squeeze(-1).clamp(0, 1).numpy()
                axis.imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0, vmax=1)
                axis.set_xticks([])
                axis.set_yticks([])
        axes[2 * row, 0].set_ylabel("eval", fontsize=8)
        axes[2 * row + 1, 0].set_ylabel(f"{name}\nMSE {mse:.4f}", fontsize=8)
    figure.suptitle("Shipped autoencoders on eval images (never trained on)", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    print(f"wrote {path}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--fresh", action="store_true", help="ignore checkpoints of stopped runs (default: resume)"
    )
    parser.add_argument("--tune", action="store_true", help="only measure the recommended settings")
    parser.add_argument(
        "--evaluate", action="store_true", help="only re-measure the eval reconstruction errors"
    )
    parser.add_argument(
        "--figure",
        type=Path,
        default=None,
        help="only write a PNG of eval images and their reconstructions (e.g. "
        "results/encoders/reconstructions.png)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.figure is not None:
        reconstruction_figure(args.figure)
        return
    if args.evaluate:
        for name in args.models:
            record_path = WEIGHTS_DIR / f"{name}.json"
            record = json.loads(record_path.read_text())
            record["eval"] = evaluate(name)
            record_path.write_text(json.dumps(record, indent=2) + "\n")
            print(name, json.dumps(record["eval"]), flush=True)
        return
    if not args.tune:
        for name in args.models:
            if MODELS[name][1] == "TileAutoencoder":
                record = choose_tile_model(name, args)
            else:
                record = train(name, args.steps, args.batch_size, args.lr, args.seed, args.fresh)
            print(
                name, json.dumps(record["eval"]), f"{record['training']['seconds']} s", flush=True
            )
    tune(args.models)
    total = sum(p.stat().st_size for p in WEIGHTS_DIR.glob("*.safetensors"))
    print(f"weights: {total / 2**20:.2f} MiB in {WEIGHTS_DIR}", flush=True)
    print(f"({math.ceil(total / 2**10)} KiB)")


if __name__ == "__main__":
    main()
