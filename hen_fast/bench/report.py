"""What a run reports: a table per case, the JSON's versions, and the PNG."""

from __future__ import annotations

import importlib.metadata
import math
import platform
from pathlib import Path

import torch

from .cases import Case, Setup, count


def label(record: dict) -> str:
    """The case of a record (or of a skipped entry), as the table heads it."""
    return Case(*(record[k] for k in ("B", "M", "d", "dtype", "similarity", "separation"))).label()


def case_table(record: dict) -> str:
    """The case's contenders: ms, fraction of the limit, and each baseline over hen_fast auto."""
    lines = [
        f"{label(record)}: limit {record['t_min_ms']:.4g} ms ({record['bound']}-bound); "
        f"auto picks {record['auto_picks']}",
        f"  {'contender':22s} {'ms':>10s} {'of limit':>9s} {'baseline/auto':>14s}",
    ]
    for group in ("hen_fast", "baselines"):
        for name, ms in record[group].items():
            who = f"hen_fast {name}" if group == "hen_fast" else name
            if not isinstance(ms, float):
                lines.append(f"  {who:22s} {ms}")
                continue
            ratio = record["ratios"].get(name)
            note = ""
            if name == "torch_compile" and record["compile_s"] is not None:
                note = f"  (compile {record['compile_s']:.1f} s, not timed)"
            elif name == "faiss":
                note = f"  ({record['faiss_index']} top-1 only)"
            lines.append(
                f"  {who:22s} {ms:10.4g} {record['fraction_of_limit'][name]:9.3g} "
                f"{'' if ratio is None else f'{ratio:.3g}':>14s}{note}"
            )
    return "\n".join(lines)


def versions(setup: Setup) -> dict:
    import hen_fast

    found = {
        "hen_fast": hen_fast.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    try:
        found["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        pass
    for name in ("entmax", "faiss"):
        module = getattr(setup, name)
        if module is not None:
            found[name] = getattr(module, "__version__", "installed")
    return found


def finite(value):
    """JSON without NaN or infinity (null instead)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def plot(records: list[dict], path: Path, matplotlib) -> bool:
    """Left: time against M for dot/softmax at B = 1 and 16, hen_fast auto solid, the best exact
    baseline (FAISS's top-1 left out) dashed. Right: hen_fast auto's fraction of the limit
    against B, per similarity/separation/dtype at its largest M."""
    records = [r for r in records if isinstance(r["hen_fast"].get("auto"), float)]
    if not records:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    dense = [r for r in records if r["similarity"] == "dot" and r["separation"] == "softmax"]
    if dense:
        dtypes = [r["dtype"] for r in dense]
        dtype = max(set(dtypes), key=dtypes.count)
        dims = sorted({r["d"] for r in dense})
        d = dims[len(dims) // 2]
        chosen = [r for r in dense if r["d"] == d and r["dtype"] == dtype]
        present = sorted({r["B"] for r in chosen})
        for color, B in enumerate([B for B in (1, 16) if B in present] or present[:2]):
            rows = sorted((r for r in chosen if r["B"] == B), key=lambda r: r["M"])
            memories = [r["M"] for r in rows]
            left.plot(
                memories,
                [r["hen_fast"]["auto"] for r in rows],
                "o-",
                color=f"C{color}",
                label=f"B={B} hen_fast",
            )
            best = [
                min(
                    (t for n, t in r["baselines"].items() if n != "faiss" and isinstance(t, float)),
                    default=float("nan"),
                )
                for r in rows
            ]
            left.plot(memories, best, "x--", color=f"C{color}", label=f"B={B} best baseline")
        left.set(
            xscale="log",
            yscale="log",
            xlabel="memories M",
            ylabel="ms",
            title=f"dot/softmax d={d} {dtype}: hen_fast auto solid, best baseline dashed",
        )
        left.legend(fontsize=7)
    groups: dict[tuple, list] = {}
    for r in records:
        groups.setdefault((r["similarity"], r["separation"], r["dtype"], r["d"]), []).append(r)
    for (similarity, separation, dtype, d), rows in sorted(groups.items()):
        M = max(r["M"] for r in rows)
        rows = sorted((r for r in rows if r["M"] == M), key=lambda r: r["B"])
        right.plot(
            [r["B"] for r in rows],
            [r["fraction_of_limit"]["auto"] for r in rows],
            "o-",
            label=f"{similarity}/{separation} {dtype} d={d} M={count(M)}",
        )
    right.set(
        xscale="log",
        xlabel="queries B",
        ylabel="T_min / T",
        ylim=(0, None),
        title="hen_fast auto: fraction of the machine's limit",
    )
    right.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
