"""The cases of a sweep, their inputs and baselines, and the timing of one case."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .machine import DTYPES, matmul_rate, memory_bytes

SEPARATIONS = {"softmax": None, "sparsemax": 2.0, "entmax": 1.5, "polynomial": None}  # -> alpha
SIMILARITIES = ("dot", "l2", "manhattan")
DEGREE = 10  # the polynomial separation's degree
BACKENDS = {"cpu": ("auto", "cpu", "torch"), "gpu": ("auto", "triton", "cuda")}
AXES = ("B", "M", "d", "dtypes", "similarities", "separations")


@dataclass(frozen=True)
class Sweep:
    """A grid of cases (every combination of its axes) plus spot grids: each overrides some axes
    of the grid, for points that would cost too much as a whole product."""

    grid: dict
    spots: tuple[dict, ...] = ()


ALL = {"similarities": SIMILARITIES, "separations": tuple(SEPARATIONS)}
SWEEPS = {
    ("cpu", "full"): Sweep(
        dict(
            B=(1, 4, 16, 64, 256, 1024, 4096),
            M=(1e5, 1e6, 1e7),
            d=(128,),
            dtypes=("float32",),
            similarities=("dot", "l2"),
            separations=("softmax",),
        ),
        (
            dict(M=(1e6,), B=(1, 16, 256), similarities=("dot",), separations=("sparsemax",)),
            dict(M=(1e6,), B=(16,), similarities=("l2",), separations=("sparsemax",)),
            dict(M=(1e6, 1e7), B=(1, 16, 256), similarities=("dot",), dtypes=("bfloat16",)),
        ),
    ),
    # The sweep the H200 run used (benchmarks/bench_retrieve_gpu.py's defaults).
    ("gpu", "full"): Sweep(
        dict(
            B=(1, 16, 256, 4096), M=(1e5, 1e6, 1e7), d=(64, 256, 1024), dtypes=tuple(DTYPES), **ALL
        )
    ),
    ("cpu", "quick"): Sweep(
        dict(
            B=(1, 16),
            M=(1e5,),
            d=(128,),
            dtypes=("float32",),
            similarities=("dot", "l2"),
            separations=("softmax",),
        ),
        (
            dict(B=(16,), similarities=("dot",), dtypes=("bfloat16",)),
            dict(B=(16,), similarities=("dot",), separations=("sparsemax",)),
        ),
    ),
    ("gpu", "quick"): Sweep(
        dict(
            B=(1, 16, 256),
            M=(1e6,),
            d=(256,),
            dtypes=("bfloat16",),
            similarities=("dot", "l2"),
            separations=("softmax",),
        ),
        (dict(B=(16,), similarities=("dot",), separations=("sparsemax",)),),
    ),
    ("cpu", "smoke"): Sweep(
        dict(
            B=(1, 5),
            M=(300,),
            d=(16,),
            dtypes=("float32",),
            similarities=("dot", "l2"),
            separations=("softmax", "sparsemax"),
        ),
        (
            dict(B=(5,), similarities=("dot",), separations=("softmax",), dtypes=("bfloat16",)),
            dict(B=(5,), similarities=("dot",), separations=("entmax", "polynomial")),
            dict(B=(5,), similarities=("manhattan",), separations=("softmax",)),
        ),
    ),
    ("gpu", "smoke"): Sweep(dict(B=(1, 5), M=(300,), d=(16,), dtypes=("float32",), **ALL)),
}


def count(n: int) -> str:
    """1000000 as 1e6 (a round large number), others with thousands separators."""
    short = f"{n:.0e}"
    return (
        short.replace("e+0", "e").replace("e+", "e")
        if n >= 10**4 and float(short) == n
        else f"{n:,}"
    )


@dataclass(frozen=True)
class Case:
    B: int
    M: int
    d: int
    dtype: str
    similarity: str
    separation: str

    @property
    def alpha(self) -> float:
        return SEPARATIONS[self.separation] or 1.5

    @property
    def element(self) -> int:
        return torch.finfo(DTYPES[self.dtype]).bits // 8

    @property
    def bank_bytes(self) -> int:
        return self.M * self.d * self.element

    @property
    def bytes(self) -> int:
        """The bank read once (the keys are the values), the queries read, the output written."""
        return self.bank_bytes + 2 * self.B * self.d * self.element

    @property
    def flops(self) -> int:
        return 2 * self.B * self.M * (self.d + self.d)

    @property
    def dense(self) -> bool:
        return self.separation in ("softmax", "polynomial")

    def label(self) -> str:
        alpha = f" {SEPARATIONS[self.separation]}" if self.separation == "entmax" else ""
        return (
            f"{self.similarity}/{self.separation}{alpha} B={self.B} M={count(self.M)} d={self.d} "
            f"{self.dtype}"
        )


def plan(args, kind: str) -> list[Case]:
    """The cases to time: the mode's sweep, or, when any axis is given, the product of the given
    axes with the mode's grid for the others."""
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    sweep = SWEEPS[kind, mode]
    given = {axis: getattr(args, axis) for axis in AXES if getattr(args, axis) is not None}
    if given:
        grids = [sweep.grid | given]
    else:
        grids = [sweep.grid, *(sweep.grid | spot for spot in sweep.spots)]
    cases = []
    for grid in grids:
        for B, M, d, dtype, similarity, separation in itertools.product(*(grid[a] for a in AXES)):
            if separation == "polynomial" and similarity != "dot":
                continue  # polynomial is defined for dot scores only
            cases.append(Case(int(B), int(M), int(d), dtype, similarity, separation))
    return list(dict.fromkeys(cases))


def t_min_s(case: Case, limits: dict) -> tuple[float, str]:
    """The machine's lower bound on the case's time, and what binds it."""
    read = case.bytes / limits["bandwidth_bytes_per_s"]
    compute = case.flops / matmul_rate(limits, case.dtype)
    return (read, "bandwidth") if read >= compute else (compute, "compute")


# ---------------------------------------------------------------------------------------------
# Inputs and baselines


def make_bank(M: int, d: int, dtype: str, device: str) -> torch.Tensor:
    """Standard normal keys, drawn in chunks so a large low-precision bank never exists in
    float32 whole."""
    generator = torch.Generator(device=device).manual_seed(0)
    bank = torch.empty(M, d, dtype=DTYPES[dtype], device=device)
    rows = max(1, (1 << 24) // d)
    for start in range(0, M, rows):
        stop = min(M, start + rows)
        bank[start:stop] = torch.randn(stop - start, d, device=device, generator=generator)
    return bank


def make_queries(bank: torch.Tensor, B: int) -> torch.Tensor:
    """Noisy copies of the first B memories (cycled when B > M), in the bank's dtype."""
    generator = torch.Generator(device=bank.device).manual_seed(1)
    rows = torch.arange(B, device=bank.device) % bank.shape[0]
    noise = torch.randn(B, bank.shape[1], device=bank.device, generator=generator)
    return (bank[rows].float() + 0.1 * noise).to(bank.dtype)


def eager(queries, keys, values, beta, similarity, separation, alpha, degree):
    """The plain materialised computation: the torch-eager and torch.compile baseline."""
    if similarity == "dot":
        scores = queries @ keys.T
    elif similarity == "l2":
        scores = -(torch.cdist(queries, keys) ** 2)
    else:
        scores = -torch.cdist(queries, keys, p=1)
    z = beta * scores.float()
    if separation == "softmax":
        weights = torch.softmax(z, dim=-1)
    elif separation == "polynomial":
        weights = torch.relu(z) ** degree
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-30)
    else:
        import entmax

        if alpha == 2.0:
            weights = entmax.sparsemax(z, -1)
        elif alpha == 1.5:
            weights = entmax.entmax15(z, -1)
        else:
            weights = entmax.entmax_bisect(z, alpha, -1)
    return weights.to(values.dtype) @ values


def sdpa(queries, keys, values, beta, similarity):
    """scaled_dot_product_attention; l2 as [2x, -1] . [k, ||k||^2] = 2 x.k - ||k||^2."""
    import torch.nn.functional as F

    if similarity == "l2":
        queries = torch.cat([2 * queries, -torch.ones_like(queries[:, :1])], dim=1)
        keys = torch.cat([keys, keys.float().pow(2).sum(1, keepdim=True).to(keys.dtype)], dim=1)
    return F.scaled_dot_product_attention(
        queries[None, None], keys[None, None], values[None, None], scale=beta
    )[0, 0]


@dataclass
class Setup:
    """What the sweep runs with."""

    kind: str  # "cpu" or "gpu": which sweep, limits and contenders
    device: str  # where the tensors live ("cpu" for a GPU sweep in smoke mode: the interpreter)
    smoke: bool
    quick: bool
    backends: tuple[str, ...]
    target_s: float = 1.0  # how long a contender's repeated runs should take (CPU)
    measure: Callable | None = None  # fn -> milliseconds per call
    entmax: object = None  # the optional modules, None when not installed
    faiss: object = None
    compiled: dict = field(default_factory=dict)  # (similarity, separation) -> compiled eager
    last_compile_s: float | None = None

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def too_big(self, need: int) -> str | None:
        """Why a CPU baseline needing ``need`` bytes is not run (the kernel would kill the run
        rather than raise), or None. A GPU baseline runs and reports OOM instead."""
        if self.device != "cpu" or self.smoke:
            return None
        room = memory_bytes("MemAvailable") // 2
        return f"memory: needs ~{need / 2**30:.1f} GiB" if need > room else None


def ready(fn: Callable) -> Callable:
    """A contender that needs no preparation: its preparation returns the timed call."""
    return lambda: fn


def baselines(setup: Setup, case: Case, queries, keys, beta: float) -> dict:
    """name -> a function that prepares the timed call (untimed) and returns it, or why the
    baseline is not run."""
    alpha, degree = case.alpha, DEGREE
    plain = (queries, keys, keys, beta, case.similarity, case.separation, alpha, degree)
    found: dict[str, Callable | str] = {}
    scores = case.B * case.M * 4
    if case.dense:
        found["torch_eager"] = setup.too_big(4 * scores) or ready(lambda: eager(*plain))
    elif setup.entmax is None:
        found["entmax"] = "not installed"
    else:  # sorting the scores needs more room than a softmax
        found["entmax"] = setup.too_big(6 * scores) or ready(lambda: eager(*plain))
    if case.dense:
        if setup.quick:
            found["torch_compile"] = "skipped in --quick"
        else:
            found["torch_compile"] = setup.too_big(4 * scores) or (lambda: compiled(setup, plain))
    if setup.kind == "gpu" and case.separation == "softmax" and case.similarity in ("dot", "l2"):
        found["sdpa"] = ready(lambda: sdpa(queries, keys, keys, beta, case.similarity))
    if setup.kind == "cpu" and case.similarity in ("dot", "l2"):
        if setup.faiss is None:
            found["faiss"] = "not installed"
        elif case.dtype != "float32":
            found["faiss"] = "float32 banks only"
        else:
            found["faiss"] = setup.too_big(case.M * case.d * 4) or (
                lambda: faiss_search(setup.faiss, case.similarity, queries, keys)
            )
    return found


def compiled(setup: Setup, plain: tuple) -> Callable:
    """torch.compile of eager, compiled by one untimed first call whose time is the record's
    compile_s. A GPU compiles each shape (as the H200 run did); the CPU marks shapes dynamic after
    the first recompile, since each compile costs seconds there; smoke only traces."""
    similarity, separation = plain[4], plain[5]
    key = (similarity, separation)
    if key not in setup.compiled:
        options = {"backend": "eager"} if setup.smoke else {}
        dynamic = False if setup.kind == "gpu" and not setup.smoke else None
        setup.compiled[key] = torch.compile(eager, dynamic=dynamic, **options)
    fn = setup.compiled[key]
    start = time.perf_counter()
    fn(*plain)
    setup.sync()
    setup.last_compile_s = time.perf_counter() - start
    return lambda: fn(*plain)


def faiss_search(faiss, similarity: str, queries, keys) -> Callable:
    """FAISS exact top-1 search (IndexFlatIP for dot, IndexFlatL2 for l2); building the index, a
    copy of the bank, is not timed."""
    index = (faiss.IndexFlatIP if similarity == "dot" else faiss.IndexFlatL2)(keys.shape[1])
    faiss.omp_set_num_threads(torch.get_num_threads())
    index.add(keys.numpy())
    search = queries.numpy()
    return lambda: index.search(search, 1)


# ---------------------------------------------------------------------------------------------
# One case


def short(error: BaseException) -> str:
    """The error's first sentence, at most 100 characters."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = text.split(". ")[0]
    return text if len(text) <= 100 else text[:97] + "..."


def run_case(setup: Setup, case: Case, keys: torch.Tensor, limits: dict, deadline: float) -> dict:
    import hen_fast
    from hen_fast.backends import BackendUnavailableError, Request, select_backend

    queries = make_queries(keys, case.B)
    beta = case.d**-0.5
    kwargs = dict(
        beta=beta,
        similarity=case.similarity,
        separation=case.separation,
        alpha=case.alpha,
        degree=DEGREE,
        check_finite=False,
    )
    dtype = DTYPES[case.dtype]
    request = Request(
        torch.device(setup.device),
        (dtype, dtype),
        False,
        num_queries=case.B,
        num_memories=case.M,
        similarity=case.similarity,
        separation=case.separation,
    )
    contenders: dict[str, tuple[str, Callable | str]] = {}
    for name in setup.backends:
        try:
            select_backend(name, request)
        except BackendUnavailableError as error:
            contenders[name] = ("hen_fast", f"n/a: {short(error)}")
            continue
        call = lambda name=name: hen_fast.retrieve(queries, keys, backend=name, **kwargs)  # noqa: E731
        contenders[name] = ("hen_fast", ready(call))
    for name, prepare in baselines(setup, case, queries, keys, beta).items():
        contenders[name] = ("baselines", prepare)

    times: dict[str, dict] = {"hen_fast": {}, "baselines": {}}
    compile_s = None
    for name, (group, prepare) in contenders.items():
        result = prepare
        if callable(prepare):
            if time.monotonic() > deadline:
                result = "budget"
            else:
                try:
                    result = setup.measure(prepare())
                    if name == "torch_compile":
                        compile_s = setup.last_compile_s
                except torch.OutOfMemoryError:
                    result = "OOM"
                except Exception as error:  # recorded, and listed at the end of the run
                    result = f"error: {short(error)}"
                finally:
                    if setup.device == "cuda":
                        torch.cuda.empty_cache()
        times[group][name] = result
    t_min, bound = t_min_s(case, limits)
    timed = {n: t for group in times.values() for n, t in group.items() if isinstance(t, float)}
    auto = times["hen_fast"].get("auto")
    record = {
        **asdict(case),
        "alpha": SEPARATIONS[case.separation],
        "dv": case.d,
        "steps": 1,
        "bytes": case.bytes,
        "flops": case.flops,
        "t_min_ms": 1e3 * t_min,
        "bound": bound,
        "auto_picks": select_backend("auto", request).name,
        "hen_fast": times["hen_fast"],
        "baselines": times["baselines"],
        "compile_s": compile_s,
        "fraction_of_limit": {n: 1e3 * t_min / t for n, t in timed.items()},
        "ratios": {
            n: t / auto
            for n, t in times["baselines"].items()
            if isinstance(t, float) and isinstance(auto, float)
        },
    }
    if "faiss" in record["baselines"]:
        record["faiss_index"] = "IndexFlatIP" if case.similarity == "dot" else "IndexFlatL2"
    return record
