"""Correctness on a GPU at the sizes the kernels exist for: a bank past 2^31 elements.

    python benchmarks/gpu_check.py --out results.json     # on a CUDA GPU (minutes)

A bf16 bank of 9e6 x 256 rows (2.3e9 elements, 4.6 GB) is retrieved from by queries that are
noisy copies of rows near its end (their offsets lie past 2^31 elements), with the triton and
cuda backends, for dot/softmax, l2/sparsemax, manhattan/entmax and dot/polynomial, once at a
moderate beta and once at beta = 1e30 (the argmax limit). The oracle is independent of the
kernels: float64 scores chunk by chunk (hen_fast.oracle.naive_scores), float64 weights by
bisection (naive_separation) over the whole row, the output as one float64 product. The error is
measured against the largest value entry (bf16 bank: 1e-2). Prints one line per case, writes
JSON, exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

CASES = [
    ("dot", "softmax", 1.5),
    ("l2", "sparsemax", 2.0),
    ("manhattan", "entmax", 1.5),
    ("dot", "polynomial", 1.5),
]
# Beta where weights spread over a few to many rows of a unit-Gaussian 256-dim bank.
BETA = {"dot": 0.1, "l2": 0.05, "manhattan": 0.05}
CHUNK = 1 << 20


def oracle(queries, keys, beta, similarity, separation, alpha):
    from hen_fast import oracle

    scores = torch.cat(
        [
            oracle.naive_scores(queries, keys[start : start + CHUNK], similarity)
            if similarity == "dot"
            else _pairwise(queries, keys[start : start + CHUNK], similarity)
            for start in range(0, keys.shape[0], CHUNK)
        ],
        dim=1,
    )
    # Scores relative to the row maximum (as the kernels form them); polynomial weights are not
    # shift-invariant and take the scores themselves.
    relative = scores if separation == "polynomial" else scores - scores.max(1, keepdim=True).values
    weights = oracle.naive_separation(beta * relative, separation, alpha)
    out = torch.zeros(queries.shape[0], keys.shape[1], dtype=torch.float64, device=keys.device)
    for start in range(0, keys.shape[0], CHUNK):
        out += weights[:, start : start + CHUNK] @ keys[start : start + CHUNK].double()
    return out, weights


def _pairwise(queries, keys, similarity):
    """float64 pairwise scores without the B x M x d difference tensor (too large here)."""
    q, k = queries.double(), keys.double()
    if similarity == "l2":
        return -torch.cdist(q, k).pow(2)
    return -torch.cdist(q, k, p=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--M", type=int, default=9_000_000)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny bank on the CPU (torch backend)")
    args = parser.parse_args(argv)
    import hen_fast
    from hen_fast.backends import cuda as cuda_backend

    device = "cpu" if args.smoke else "cuda"
    gen = torch.Generator(device=device).manual_seed(7)
    keys = torch.randn(args.M, args.d, device=device, generator=gen).to(torch.bfloat16)
    assert args.smoke or keys.numel() > 2**31, "the bank must lie past 2^31 elements"
    rows = torch.tensor([args.M - 1, args.M - 2, args.M // 2, 3], device=device)
    queries = (
        keys[rows].float() + 0.3 * torch.randn(len(rows), args.d, device=device, generator=gen)
    ).to(torch.bfloat16)
    if args.smoke:
        backends = ["torch", "cpu"]
    else:
        backends = ["triton"] + (["cuda"] if cuda_backend.is_available() else [])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    records, failed = [], 0
    bank = dict(M=args.M, d=args.d, dtype="bfloat16")  # in every record
    for similarity, separation, alpha in CASES:
        for beta in (BETA[similarity], 1e30):
            expected, weights = oracle(queries, keys, beta, similarity, separation, alpha)
            support = (weights > 0).sum(1).tolist()
            case = dict(similarity=similarity, separation=separation, alpha=alpha, beta=beta)
            for backend in backends:
                sync()
                start = time.perf_counter()
                try:
                    out = hen_fast.retrieve(queries, keys, **case, backend=backend)
                    sync()
                    err = float((out.double() - expected).abs().max() / keys.abs().max().double())
                    if out.isnan().any():
                        err = float("inf")
                    note = ""
                except Exception as error:  # noqa: BLE001 - every failure is reported, not raised
                    err, note = float("inf"), f"{type(error).__name__}: {error}"[:300]
                seconds = time.perf_counter() - start
                ok = err <= 1e-2
                failed += not ok
                outcome = dict(rel_err=err, ok=ok, support=support, seconds=seconds, note=note)
                records.append(dict(backend=backend, **case, **bank, **outcome))
                print(
                    f"{'ok  ' if ok else 'FAIL'} {backend:6s} {similarity:9s} {separation:10s} "
                    f"beta={beta:<8g} err={err:.2e} support={support} {seconds:.2f}s {note}",
                    flush=True,
                )
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(
                dict(
                    device=torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                    torch=torch.__version__,
                    records=records,
                ),
                handle,
                indent=1,
            )
    print(f"{len(records) - failed}/{len(records)} passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
