"""Retrieval over a bank index (MemoryBank.build_index) against the full-scan kernel, side by
side in one run, on the CPU: the fraction of the bank read, the speed-up and the agreement, swept
over beta, bank size M and query noise, on banks with structure and without.

    python benchmarks/index_cpu.py                 # the default sweeps, M = 1e6 (~15 minutes)
    python benchmarks/index_cpu.py --quick --out /tmp/index.json
    python benchmarks/index_cpu.py --build-only 1e7   # the k-means build of a 1e7-row bank
    python benchmarks/index_cpu.py --table benchmarks/results/index-cpu-<date>.json  # README

Data (everything offline):

* ``clustered``: unit vectors around 2000 random unit centres (d = 128, per-coordinate noise
  --spread), the bank shuffled;
* ``patches``: every 8x8 colour patch at stride 2 of scikit-image's photos (d = 192, ~1e6),
  mean removed and unit norm, flat patches dropped: real image features with real structure;
* ``isotropic``: unit Gaussian directions (d = 128), where no bound prunes;
* ``text`` (``--data text``, needs the ``text`` extra, ~15 minutes the first time): MiniLM
  sentence embeddings of the installed Python's docstring sentences (d = 384, --text-rows);
* ``tokens`` (``--data tokens``, the ``text`` extra, ~10 minutes the first time for 1e6):
  MiniLM's contextual token embeddings of those sentences (d = 384, --M of them).

Queries are noisy copies of stored memories (noise ``sigma / sqrt(d)`` per coordinate, then unit
norm), dot similarity. Each case makes --calls calls of B queries each (fresh queries per call:
one query's luck does not decide a case); each call times the indexed call (backend auto) and
the full scan (the same call on a bank of the same tensors without an index, backend auto)
alternately, median of --runs after a warm-up. A case's speed-up is its total scan time over its
total indexed time (each call's is kept too), its fraction read the mean over its queries, and
``recall`` the share of queries whose output is nearest the memory they were made from.
JSON goes to benchmarks/results/index-cpu-<date>.json, the plot beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import hen_fast
from hen_fast.bench.machine import machine_name

RESULTS = Path(__file__).resolve().parent / "results"
SEPARATIONS = (("sparsemax", 2.0), ("entmax", 1.5), ("softmax", 1.0))
# Highest scores per query the agreement check solves the sparse threshold on (within_rounding).
SUPPORT_CHECK_ROWS = 1 << 16


def clustered(rows: int, gen, spread: float, groups: int = 2000, dim: int = 128) -> torch.Tensor:
    centres = torch.nn.functional.normalize(torch.randn(groups, dim, generator=gen), dim=1)
    keys = centres[torch.randint(0, groups, (rows,), generator=gen)]
    keys = keys + spread * torch.randn(rows, dim, generator=gen)
    return torch.nn.functional.normalize(keys, dim=1)


def patches(rows: int, gen) -> torch.Tensor:
    from hen_fast.datasets import natural_patches

    flat = natural_patches(size=8, stride=2).flatten(1)
    flat = flat - flat.mean(dim=1, keepdim=True)
    flat = flat[flat.norm(dim=1) > 0.05]  # flat patches: noise once normalised
    flat = flat[torch.randperm(flat.shape[0], generator=gen)[:rows]]
    return torch.nn.functional.normalize(flat, dim=1)


def text(rows: int, gen) -> torch.Tensor:
    """MiniLM sentence embeddings (the ``text`` extra's offline model) of up to ``rows`` distinct
    sentences of the installed Python's docstrings (standard library first, then packages):
    real text embeddings, d = 384. Encoding runs ~120 sentences/s on two cores, so they are
    cached in ~/.cache/hen_fast."""
    cache = Path.home() / ".cache" / "hen_fast" / f"index-text-{rows}.pt"
    if cache.exists():
        return torch.load(cache)
    from hen_fast.encoders import load_text

    sentences = docstring_sentences(rows)
    keys = load_text("minilm").encode(sentences, batch_size=256, progress=True)
    keys = torch.nn.functional.normalize(keys[torch.randperm(keys.shape[0], generator=gen)], dim=1)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(keys, cache)
    return keys


def tokens(rows: int, gen) -> torch.Tensor:
    """MiniLM's contextual token embeddings (its last layer, per word piece, before pooling; the
    [CLS] and [SEP] tokens left out) of the same docstring sentences, unit norm: ``rows`` real
    embeddings, d = 384, from ~rows / 20 sentences (the vectors a late-interaction retriever
    stores). Cached in ~/.cache/hen_fast like ``text``."""
    cache = Path.home() / ".cache" / "hen_fast" / f"index-tokens-{rows}.pt"
    if cache.exists():
        return torch.load(cache)
    from hen_fast.encoders import load_text

    model = load_text("minilm").model
    sentences = docstring_sentences(max(1, rows // 8))
    parts, count, batch = [], 0, 4096
    with tqdm(total=rows, desc="token embeddings", unit="row") as bar:
        for start in range(0, len(sentences), batch):
            out = model.encode(sentences[start:start + batch], batch_size=256,
                               output_value="token_embeddings")  # fmt: skip
            for piece in out:
                piece = torch.as_tensor(piece)[1:-1]  # no [CLS], [SEP]
                parts.append(piece)
                count += piece.shape[0]
                bar.update(piece.shape[0])
            if count >= rows:
                break
    keys = torch.cat(parts)[:rows].float()
    keys = torch.nn.functional.normalize(keys[torch.randperm(keys.shape[0], generator=gen)], dim=1)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(keys, cache)
    return keys


def docstring_sentences(limit: int) -> list[str]:
    import ast
    import re
    import sysconfig

    seen: dict[str, None] = {}
    for root in (sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]):
        for path in sorted(Path(root).rglob("*.py")):
            try:
                tree = ast.parse(path.read_text(errors="ignore"))
            except (SyntaxError, ValueError):
                continue
            for node in ast.walk(tree):
                if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                         ast.AsyncFunctionDef)):  # fmt: skip
                    continue
                for paragraph in re.split(r"\n\s*\n", ast.get_docstring(node) or ""):
                    for sentence in re.split(r"(?<=[.!?])\s+", " ".join(paragraph.split())):
                        if 30 <= len(sentence) <= 300 and not sentence.startswith(">>>"):
                            seen[sentence] = None
                if len(seen) >= limit:
                    return list(seen)[:limit]
    return list(seen)


def isotropic(rows: int, gen, dim: int = 128) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=gen), dim=1)


def noisy_copies(bank, count: int, sigma: float, gen):
    picks = torch.randint(0, len(bank), (count,), generator=gen)
    keys = bank.keys[picks]
    noise = sigma / math.sqrt(keys.shape[1]) * torch.randn(keys.shape, generator=gen)
    return torch.nn.functional.normalize(keys + noise, dim=1), picks


def within_rounding(queries, keys, *, beta, separation, alpha, info, full_info) -> dict:
    """Whether the indexed call agrees with the scan up to float32 rounding: per query, its
    support count differs from the scan's by no more than the rows whose float64 score lies
    within rounding (``tol``, 8 sqrt(d) float32 units of ``||x|| max ||k||``) of the float64
    boundary (sparse: between the lowest score in the support and the highest outside it;
    softmax: the 1e-6 weight the support counts), which two float32 computations may place on
    either side; and its argmax scores within ``tol`` of the scan's. Dense, near-duplicate data
    (image patches) has such rows; the two scan backends then differ too."""
    scores = queries.double() @ keys.double().T
    dim = keys.shape[1]
    tol = 8 * dim**0.5 * 2.0**-24 * queries.double().norm(dim=1) * keys.double().norm(dim=1).max()
    if separation == "softmax":
        lse = torch.logsumexp(beta * scores, dim=1)
        edge = (lse + math.log(1e-6)) / beta  # weight 1e-6
        low, high = edge, edge
    else:
        # over each query's highest scores only (the oracle's bisection over every row costs
        # minutes): the threshold is theirs while the support fits, as it does here
        top = scores.topk(min(scores.shape[1], SUPPORT_CHECK_ROWS), dim=1).values
        weights = hen_fast.oracle.naive_separation(beta * top, separation, alpha)
        inside = weights > 0
        assert not bool(inside[:, -1].any()) or top.shape[1] == scores.shape[1], "support > top"
        low = torch.where(inside, top, math.inf).min(dim=1).values
        high = torch.where(inside, -math.inf, top).max(dim=1).values
    near = ((scores >= (torch.minimum(low, high) - tol)[:, None])
            & (scores <= (torch.maximum(low, high) + tol)[:, None])).sum(dim=1)  # fmt: skip
    gap = (info.support - full_info.support).abs()
    picked = scores.gather(1, info.argmax[:, None])[:, 0]
    best = scores.gather(1, full_info.argmax[:, None])[:, 0]
    return {
        "support_diff_max": int(gap.max()),
        "support_within_rounding": bool((gap <= near).all()),
        "argmax_within_rounding": bool((picked >= best - tol).all()),
    }


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(bank, plain, queries, picks, *, beta, separation, alpha, runs) -> dict:
    """One case: the indexed call and the scan (``plain``: the same tensors as a bank without
    an index, so both reuse the bank's finiteness check and norms), timed alternately, and how
    they agree."""
    kwargs = dict(beta=beta, separation=separation, alpha=alpha)
    out, info = hen_fast.retrieve(queries, bank, return_info=True, **kwargs)
    full, full_info = hen_fast.retrieve(queries, plain, return_info=True, **kwargs)
    indexed_ms, scan_ms = [], []  # timed without info: softmax's support count costs a pass
    for _ in range(runs):  # alternate, so drift hits both alike (warmed up by the calls above)
        indexed_ms.append(1e3 * _seconds(lambda: hen_fast.retrieve(queries, bank, **kwargs)))
        scan_ms.append(1e3 * _seconds(lambda: hen_fast.retrieve(queries, plain, **kwargs)))
    nearest = (full @ bank.keys.T).argmax(dim=1)
    indexed, scanned = statistics.median(indexed_ms), statistics.median(scan_ms)
    return {
        "indexed_ms": indexed,
        "scan_ms": scanned,
        "speedup": scanned / indexed,
        "fraction_read": float(info.fraction_read.double().mean()),
        "fraction_read_max": float(info.fraction_read.max()),
        "scanned_queries": int((info.fraction_read == 1).sum()),
        "mass_bound_max": float(info.mass_bound.max()),
        "max_abs_diff": float((out - full).abs().max()),
        "same_support": bool(torch.equal(info.support, full_info.support)),
        "same_argmax": bool(torch.equal(info.argmax, full_info.argmax)),
        **within_rounding(queries, bank.keys, beta=beta, separation=separation, alpha=alpha,
                          info=info, full_info=full_info),
        "recall": float((nearest == picks).double().mean()),
    }


def combined(parts: list[dict]) -> dict:
    """The calls of one case together: mean times per call, the speed-up of them all (total scan
    time over total indexed time) and each call's, the worst agreement."""
    total = {key: sum(p[key] for p in parts) for key in ("indexed_ms", "scan_ms")}
    count = len(parts)
    return {
        "calls": count,
        "indexed_ms": total["indexed_ms"] / count,
        "scan_ms": total["scan_ms"] / count,
        "speedup": total["scan_ms"] / total["indexed_ms"],
        "speedup_per_call": [p["speedup"] for p in parts],
        "fraction_read": sum(p["fraction_read"] for p in parts) / count,
        "fraction_read_max": max(p["fraction_read_max"] for p in parts),
        "scanned_queries": sum(p["scanned_queries"] for p in parts),
        "mass_bound_max": max(p["mass_bound_max"] for p in parts),
        "max_abs_diff": max(p["max_abs_diff"] for p in parts),
        "same_support": all(p["same_support"] for p in parts),
        "same_argmax": all(p["same_argmax"] for p in parts),
        "support_diff_max": max(p["support_diff_max"] for p in parts),
        "support_within_rounding": all(p["support_within_rounding"] for p in parts),
        "argmax_within_rounding": all(p["argmax_within_rounding"] for p in parts),
        "recall": sum(p["recall"] for p in parts) / count,
    }


def build(name: str, rows: int, args, gen):
    keys = {"clustered": lambda: clustered(rows, gen, args.spread), "patches": lambda: patches(
        rows, gen), "isotropic": lambda: isotropic(rows, gen),
        "text": lambda: text(min(rows, args.text_rows), gen),
        "tokens": lambda: tokens(rows, gen)}[name]()  # fmt: skip
    bank = hen_fast.MemoryBank(keys)
    start = time.perf_counter()
    index = bank.build_index()
    seconds = time.perf_counter() - start
    plain = hen_fast.MemoryBank(bank.keys)
    return bank, plain, {"data": name, "M": len(bank), "d": keys.shape[1],
                         "clusters": index.num_clusters, "sketch_dim": index.sketch_dim,
                         "build_s": seconds}  # fmt: skip


def sweeps(args) -> list[tuple]:
    """(data, M, B, sigma, beta) cases: beta at the default noise, M, and noise."""
    cases = []
    for data in args.data:
        for batch in args.B:
            cases += [(data, args.M, batch, args.sigma, beta) for beta in args.beta]
            if data == "clustered":
                cases += [(data, m, batch, args.sigma, args.beta_fixed) for m in args.M_sweep]
            cases += [(data, args.M, batch, s, args.beta_fixed) for s in args.sigma_sweep]
    unique = []
    for case in cases:
        if case not in unique:
            unique.append(case)
    return unique


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", default=["clustered", "patches", "isotropic"])
    parser.add_argument("--M", type=float, default=1e6)
    parser.add_argument("--M-sweep", type=float, nargs="+", default=[1e5, 3e5])
    parser.add_argument("--B", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--beta", type=float, nargs="+", default=[10, 30, 100, 300, 1000])
    parser.add_argument("--beta-fixed", type=float, default=100)
    parser.add_argument("--sigma", type=float, default=0.3, help="query noise (norm)")
    parser.add_argument("--sigma-sweep", type=float, nargs="*", default=[0.1, 0.6, 1.0])
    parser.add_argument("--spread", type=float, default=0.05, help="clustered: noise per coord")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=8,
                        help="calls per case, each with queries of its own")  # fmt: skip
    parser.add_argument("--text-rows", type=int, default=100_000,
                        help="text (not in the default --data): sentences embedded")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to test the script")
    parser.add_argument("--build-only", type=float, metavar="M",
                        help="only time build_index on M clustered rows (JSON: index-build-*)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--table", type=Path, metavar="JSON",
                        help="only print a saved run's markdown table and redraw its plot")
    args = parser.parse_args(argv)
    if args.table:
        saved = json.loads(args.table.read_text())
        args.sigma = saved.get("sigma", args.sigma)
        args.data = list(dict.fromkeys(r["data"] for r in saved["rows"]))
        plot(saved["rows"], args.table.with_suffix(".png"), args)
        return print(markdown_table(saved["rows"], args.sigma))
    if args.build_only:
        return build_only(int(args.build_only), args)
    if args.quick:
        args.M, args.M_sweep, args.B, args.beta = 2e4, [5e3], [1, 4], [30, 300]
        args.sigma_sweep, args.runs, args.data = [0.6], 2, ["clustered", "isotropic"]
        args.calls = 2
    args.M, args.M_sweep = int(args.M), [int(m) for m in args.M_sweep]
    today = datetime.date.today().isoformat()
    out = args.out or RESULTS / f"index-cpu-{today}.json"
    gen = torch.Generator().manual_seed(0)
    banks: dict = {}
    rows = []
    for data, m, batch, sigma, beta in tqdm(sweeps(args), desc="cases"):
        if (data, m) not in banks:
            banks[(data, m)] = build(data, m, args, gen)
        bank, plain, built = banks[(data, m)]
        calls = [noisy_copies(bank, batch, sigma, gen) for _ in range(args.calls)]
        for separation, alpha in SEPARATIONS:
            row = dict(built, B=batch, sigma=sigma, beta=beta, separation=separation)
            row.update(combined([compare(bank, plain, queries, picks, beta=beta,
                                         separation=separation, alpha=alpha, runs=args.runs)
                                 for queries, picks in calls]))  # fmt: skip
            rows.append(row)
            tqdm.write(
                f"{data:9s} M={len(bank):8d} B={batch:2d} sigma={sigma:4.2f} beta={beta:6g} "
                f"{separation:9s} read {row['fraction_read']:7.2%} "
                f"{row['indexed_ms']:8.2f} ms vs scan {row['scan_ms']:8.2f} ms "
                f"x{row['speedup']:5.2f} recall {row['recall']:.2f} "
                f"same support {row['same_support']}{_agreement(row)}"
            )
    result = {
        "what": "hen_fast.retrieve over MemoryBank.build_index vs the full scan, dot similarity",
        "date": today,
        "cpu": machine_name("cpu"),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "hen_fast": hen_fast.__version__,
        "python": platform.python_version(),
        "command": " ".join(["python benchmarks/index_cpu.py", *(sys.argv[1:] if argv is None
                                                                 else argv)]),
        "sigma": args.sigma,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(rows, out.with_suffix(".png"), args)
    print(markdown_table(rows, args.sigma))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def build_only(rows: int, args) -> None:
    """The build time of the default index for ``rows`` clustered rows, and one query's read."""
    gen = torch.Generator().manual_seed(0)
    bank, _, built = build("clustered", rows, args, gen)
    queries, _ = noisy_copies(bank, 1, args.sigma, gen)
    _, info = hen_fast.retrieve(queries, bank, beta=100.0, separation="sparsemax",
                                return_info=True)  # fmt: skip
    built["fraction_read_sparsemax_beta100"] = float(info.fraction_read[0])
    today = datetime.date.today().isoformat()
    out = args.out or RESULTS / f"index-build-cpu-{today}.json"
    result = {"what": "MemoryBank.build_index() on clustered data", "date": today,
              "cpu": machine_name("cpu"), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "hen_fast": hen_fast.__version__, **built}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def markdown_table(rows: list[dict], sigma: float) -> str:
    """The beta sweep at the largest M and query noise ``sigma``: one line per (data, B, beta),
    per separation the fraction read and the speed-up (times in ms: indexed / scan)."""
    top = {}
    for r in rows:
        top[r["data"]] = max(top.get(r["data"], 0), r["M"])
    chosen = [r for r in rows if r["M"] == top[r["data"]] and r["sigma"] == sigma]
    names = [name for name, _ in SEPARATIONS]
    lines = ["| data, M, clusters | B | beta | " + " | ".join(names) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]  # fmt: skip
    keys = sorted({(r["data"], r["B"], r["beta"]) for r in chosen},
                  key=lambda k: (list(top).index(k[0]), k[1], k[2]))  # fmt: skip
    for data, batch, beta in keys:
        cells, first = [], None
        for name in names:
            r = next((r for r in chosen if (r["data"], r["B"], r["beta"], r["separation"])
                      == (data, batch, beta, name)), None)  # fmt: skip
            first = first or r
            cells.append("-" if r is None else
                         f"{r['fraction_read']:.2%} read, {r['speedup']:.2f}x "
                         f"({r['indexed_ms']:.1f} / {r['scan_ms']:.1f})"
                         + _agreement(r))
        what = f"{data}, {first['M']:.0e}, {first['clusters']}"
        lines.append(f"| {what} | {batch} | {beta:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _agreement(row: dict) -> str:
    """'' where support and argmax equal the scan's, ', +-n rows at the edge' where they differ
    only within float32 rounding of it, else ', DIFFERS'."""
    if row["same_support"] and row["same_argmax"]:
        return ""
    if row.get("support_within_rounding") and row.get("argmax_within_rounding"):
        return f", ±{row['support_diff_max']} at the edge"
    return ", DIFFERS"


def plot(rows: list[dict], path: Path, args) -> None:
    """Fraction read and speed-up against beta, M and noise: one column per sweep, one line per
    (data, separation), B = 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = {}  # each data set's largest bank (patches: as many as the photos give)
    for r in rows:
        top[r["data"]] = max(top.get(r["data"], 0), r["M"])
    sweeps_ = [("beta", lambda r: r["sigma"] == args.sigma and r["M"] == top[r["data"]], True),
               ("M", lambda r: r["beta"] == args.beta_fixed and r["sigma"] == args.sigma, True),
               ("sigma", lambda r: r["beta"] == args.beta_fixed and r["M"] == top[r["data"]],
                False)]  # fmt: skip
    figure, axes = plt.subplots(2, 3, figsize=(15, 8), squeeze=False)
    batch = min(args.B)
    for column, (key, keep, log_x) in enumerate(sweeps_):
        for data in args.data:
            for separation, _ in SEPARATIONS:
                chosen = sorted((r for r in rows if r["data"] == data and r["B"] == batch
                                 and r["separation"] == separation and keep(r)),
                                key=lambda r: r[key])  # fmt: skip
                if len(chosen) < 2:
                    continue
                xs = [r[key] for r in chosen]
                label = f"{data} {separation}"
                axes[0][column].plot(xs, [r["fraction_read"] for r in chosen], "o-", label=label)
                axes[1][column].plot(xs, [r["speedup"] for r in chosen], "o-", label=label)
        for row_axes, ylabel in ((axes[0][column], "fraction of the bank read"),
                                 (axes[1][column], "speed-up over the full scan")):  # fmt: skip
            row_axes.set_xlabel(key)
            row_axes.set_ylabel(ylabel)
            row_axes.set_yscale("log")
            if log_x:
                row_axes.set_xscale("log")
            row_axes.grid(True, which="both", alpha=0.3)
        axes[1][column].axhline(1.0, color="black", linewidth=0.8)
    axes[0][0].legend(fontsize=7)
    figure.suptitle(f"bank index vs full scan, B = {batch}, dot similarity ({machine_name('cpu')})")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


if __name__ == "__main__":
    main()
