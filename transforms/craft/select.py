"""Stage ``craft`` (selection): label rows vanilla or IdK from μ, σ and the knowledge flow Δμ.

Zhu et al., CRaFT, AAAI-25, arXiv 2410.06913, Algorithm 1 and §4.3, following the public
code (github.com/opendatalab/CRaFT) where the paper is vague. Inputs per row, written by
the query stages: ``correctness_init`` (μ of the initial model M0), ``certainty_init`` (σ
of M0) and ``knowledge_flow`` (Δμ = μ(M̃) − μ(M0), M̃ = M0 after rehearsal).

Step 1, candidates (thresholds per task):

- vanilla: μ ≥ τ_hi;
- IdK: μ ≤ τ_lo and Δμ < 0 (the flow says the model is losing the question, so refusing
  it does not fight what fine-tuning will teach anyway). Δμ = 0 also counts for MCQ by
  default (``mcq_zero_flow_is_idk``, as the code does) and optionally for open QA;
- everything else is rejected: ``craft:ambiguous_correctness`` (τ_lo < μ < τ_hi) or
  ``craft:knowledge_flow_nonnegative`` (low μ but Δμ not negative enough).

Defaults: τ_hi/τ_lo = 0.51/0.49 for open QA (μ is a fraction of 10 samples, so 0.5 is
ambiguous) and 0.5/0.5 for MCQ. Vanilla is tested first, so with τ_hi = τ_lo the IdK side is
strict: MCQ vanilla is μ ≥ 0.5 and MCQ IdK is μ < 0.5, exactly Algorithm 1's split.

Open QA and the code's strict rule: a question M0 never answers right has μ = 0, hence
Δμ ≥ 0, so it is never IdK and is dropped. ``admit_never_correct`` admits every open-QA
row with μ = 0 as an IdK candidate whatever its flow.

Step 2, fill: the most certain vanilla candidates (σ descending) and the least certain IdK
candidates (σ ascending); ties by μ (higher first for vanilla, lower first for IdK), then by
id. The quota is ``round(size × idk_share)`` IdK rows (half up) and the rest vanilla; the
default share 0.2 is the code's 2000/8000 (open QA) and 1000/4000 (MCQ). Candidates beyond
the quota are rejected as ``craft:over_quota``. With ``size=None`` the target is the largest
size whose quota the candidates fill. When candidates run short, what exists is kept and
``stats["warnings"]`` says so; rows are sampled with replacement only with ``replace=True``
(the repeats are counted in ``StageResult.added``).

Baselines and ablations (the paper's Table 2 rows):

- ``cor_rait``: R-Tuning (Zhang et al., NAACL 2024), correctness only: vanilla μ ≥ τ_hi,
  IdK μ ≤ τ_lo, no flow, seeded random fill;
- ``craft_wo_flow``: CRaFT without rehearsal: certainty ordering, IdK is μ ≤ τ_lo;
- ``craft_wo_cer``: the flow condition, then seeded random fill;
- ``vanilla``: Van-Tuning, every row kept unchanged as vanilla; with ``size`` a seeded
  random ``size`` rows (the paper's "randomly selects N_van + N_idk samples").

``fidelity: code`` reproduces the released code's MCQ selection (``mmlu_RAI.py``) where it
differs from the above: the certainty-ordered pools are cut with pandas' ``nsmallest`` /
``nlargest(keep='all')``, so every row tied with the last one taken is kept too (a pool
can exceed its quota); a pool short of its quota is refilled by sampling with replacement;
and the random fills (Cor-RAIT, CRaFT w/o Cer, and Van-Tuning with a ``size`` on an all-MCQ
table) draw their rows *with replacement* even from a large pool (``sample(n,
replace=True)``). Repeats are counted in ``added``. The open-QA
code (``triviaqa_RAI.py``) samples without replacement, so open-QA selection is the same
under both fidelities.

Rows of another task (``instruction``) are rejected as ``craft:unsupported_task`` except by
``vanilla``; a row whose score a rule needs is null or NaN is rejected as
``craft:missing_score``. Random fills order rows by a hash of (seed, id), so a seed gives
the same selection whatever the input row order.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash
from pydantic import BaseModel, ConfigDict, Field, model_validator

from transforms.schema import rejected
from transforms.stage import StageResult, reject_table

STAGE = "craft"
METHODS = ("craft", "cor_rait", "craft_wo_flow", "craft_wo_cer", "vanilla")
Method = Literal["craft", "cor_rait", "craft_wo_flow", "craft_wo_cer", "vanilla"]
QA_TASKS = ("open_qa", "mcq")

LABEL_COLUMN = "craft_label"
VANILLA = "vanilla"
IDK = "idk"

CORRECTNESS = "correctness_init"
CERTAINTY = "certainty_init"
FLOW = "knowledge_flow"

AMBIGUOUS = "craft:ambiguous_correctness"
FLOW_NONNEGATIVE = "craft:knowledge_flow_nonnegative"
OVER_QUOTA = "craft:over_quota"
MISSING_SCORE = "craft:missing_score"
UNSUPPORTED_TASK = "craft:unsupported_task"

DEFAULT_THRESHOLDS: dict[str, tuple[float, float]] = {"open_qa": (0.51, 0.49), "mcq": (0.5, 0.5)}
"""(τ_hi, τ_lo) per task: the CRaFT code's defaults."""

_USES_FLOW = frozenset({"craft", "craft_wo_cer"})
_USES_CERTAINTY = frozenset({"craft", "craft_wo_flow"})


class SelectionParams(BaseModel):
    """CRaFT selection parameters; the defaults are the paper's and the code's."""

    model_config = ConfigDict(extra="forbid")
    method: Method = "craft"
    tau_hi: float | None = Field(default=None, ge=0.0, le=1.0)
    """Vanilla threshold (μ ≥ τ_hi); None → 0.51 for open QA, 0.5 for MCQ."""
    tau_lo: float | None = Field(default=None, ge=0.0, le=1.0)
    """IdK threshold (μ ≤ τ_lo, below τ_hi); None → 0.49 for open QA, 0.5 for MCQ."""
    idk_share: float = Field(default=0.2, ge=0.0, le=1.0)
    size: int | None = Field(default=None, ge=0)
    """Target rows; None → as many as the candidates allow at ``idk_share``."""
    mcq_zero_flow_is_idk: bool = True
    oeqa_zero_flow_is_idk: bool = False
    admit_never_correct: bool = False
    seed: int = 0
    replace: bool = False
    fidelity: Literal["paper", "code"] = "paper"
    """``code``: the released code's MCQ ties, refills and sampling (module docstring)."""

    @model_validator(mode="after")
    def _ordered_thresholds(self) -> SelectionParams:
        for task in QA_TASKS:
            self.thresholds(task)
        return self

    def thresholds(self, task: str) -> tuple[float, float]:
        """(τ_hi, τ_lo) for ``task``, task defaults filled in."""
        hi_default, lo_default = DEFAULT_THRESHOLDS[task]
        hi = hi_default if self.tau_hi is None else self.tau_hi
        lo = lo_default if self.tau_lo is None else self.tau_lo
        if lo > hi:
            raise ValueError(f"{task}: tau_lo {lo} is above tau_hi {hi}")
        return hi, lo

    def zero_flow_is_idk(self, task: str) -> bool:
        """Whether Δμ = 0 qualifies as IdK for ``task``."""
        return self.mcq_zero_flow_is_idk if task == "mcq" else self.oeqa_zero_flow_is_idk


def select(table: pa.Table, params: SelectionParams) -> StageResult:
    """Label each row ``vanilla`` or ``idk`` (column ``craft_label``) or reject it with a reason.

    Kept rows stay in input order (repeats drawn with ``replace=True`` follow them).

    Raises:
        ValueError: a score column the method needs is absent.
    """
    n = table.num_rows
    method = params.method
    _check_columns(table, method)
    reasons = np.full(n, None, dtype=object)
    labels = np.full(n, None, dtype=object)
    extra: list[tuple[int, str]] = []  # (row, label) repeats drawn with replacement
    warnings: list[str] = []
    per_task: dict[str, Any] = {}
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)

    if method == "vanilla":
        rows = np.arange(n)
        target = n if params.size is None else params.size
        per_task["all"] = {
            "candidates": {VANILLA: n, IDK: 0},
            "quota": {VANILLA: target, IDK: 0},
        }
        if params.size is None:
            labels[:] = VANILLA
        else:
            order = rows[_random_order(ids[rows], params.seed)]
            code_mcq = params.fidelity == "code" and _all_mcq(table)
            fill = _draw_with_replacement if code_mcq else _fill
            take, repeats = fill(order, params.size, "rows", "all tasks", params, warnings)
            labels[take] = VANILLA
            reasons[np.setdiff1d(rows, take)] = OVER_QUOTA
            extra.extend((int(r), VANILLA) for r in repeats)
    else:
        tasks = np.asarray(table.column("task").to_pylist(), dtype=object)
        qa = np.isin(tasks, QA_TASKS)
        reasons[~qa] = UNSUPPORTED_TASK
        mu = _floats(table, CORRECTNESS)
        sigma = _floats(table, CERTAINTY) if method in _USES_CERTAINTY else None
        flow = _floats(table, FLOW) if method in _USES_FLOW else None
        present = [t for t in QA_TASKS if (tasks == t).any()]
        sizes = _split_size(params.size, [int((tasks == t).sum()) for t in present])
        for task, size in zip(present, sizes, strict=True):
            rows = np.flatnonzero(tasks == task)
            per_task[task] = _select_task(
                task, rows, ids, mu, sigma, flow, size, params, reasons, labels, extra, warnings
            )

    keep = np.flatnonzero(labels != None)  # noqa: E711 (element-wise on an object array)
    drop = np.flatnonzero(labels == None)  # noqa: E711
    if any(reason is None for reason in reasons[drop]):
        raise AssertionError("craft selection dropped a row without a reason")
    take = np.concatenate([keep, np.asarray([r for r, _ in extra], dtype=np.int64)])
    kept_labels = [*labels[keep].tolist(), *(label for _, label in extra)]
    kept = table.take(pa.array(take, pa.int64()))
    if LABEL_COLUMN in kept.column_names:
        kept = kept.drop_columns([LABEL_COLUMN])
    kept = kept.append_column(LABEL_COLUMN, pa.array(kept_labels, pa.string()))
    dropped = table.take(pa.array(drop, pa.int64()))
    if LABEL_COLUMN in dropped.column_names:
        dropped = dropped.drop_columns([LABEL_COLUMN])
    rejected_rows = reject_table(rejected(dropped, STAGE, reasons[drop].tolist()))
    stats = {
        "method": method,
        "rows_in": n,
        "labels": {VANILLA: kept_labels.count(VANILLA), IDK: kept_labels.count(IDK)},
        "reasons": dict(Counter(reasons[drop].tolist())),
        "candidates": _sum_over(per_task, "candidates"),
        "quota": _sum_over(per_task, "quota"),
        "per_task": per_task,
        "added": len(extra),
        "warnings": warnings,
    }
    return StageResult(kept=kept, rejected=rejected_rows, added=len(extra), stats=stats)


def _select_task(
    task: str,
    rows: np.ndarray,
    ids: np.ndarray,
    mu_all: np.ndarray,
    sigma_all: np.ndarray | None,
    flow_all: np.ndarray | None,
    size: int | None,
    params: SelectionParams,
    reasons: np.ndarray,
    labels: np.ndarray,
    extra: list[tuple[int, str]],
    warnings: list[str],
) -> dict[str, Any]:
    """Candidates, quota and fill for the rows of one task; writes ``reasons``/``labels``."""
    hi, lo = params.thresholds(task)
    mu = mu_all[rows]
    missing = np.isnan(mu)
    vanilla = ~missing & (mu >= hi)
    low = ~missing & ~vanilla & (mu <= lo)
    ambiguous = ~missing & ~vanilla & ~low
    idk = low.copy()
    flow_fail = np.zeros(len(rows), dtype=bool)
    if flow_all is not None:
        flow = flow_all[rows]
        passes = flow < 0
        if params.zero_flow_is_idk(task):
            passes |= flow == 0
        if params.admit_never_correct and task == "open_qa":
            passes |= mu == 0
        idk = low & passes
        flow_missing = low & ~passes & np.isnan(flow)
        flow_fail = low & ~passes & ~flow_missing
        missing |= flow_missing
    if sigma_all is not None:
        no_sigma = np.isnan(sigma_all[rows])
        missing |= (vanilla | idk) & no_sigma
        vanilla &= ~no_sigma
        idk &= ~no_sigma
    reasons[rows[missing]] = MISSING_SCORE
    reasons[rows[ambiguous]] = AMBIGUOUS
    reasons[rows[flow_fail]] = FLOW_NONNEGATIVE

    van_rows, idk_rows = rows[vanilla], rows[idk]
    if sigma_all is not None:
        van_rows = van_rows[np.lexsort((ids[van_rows], -mu_all[van_rows], -sigma_all[van_rows]))]
        idk_rows = idk_rows[np.lexsort((ids[idk_rows], mu_all[idk_rows], sigma_all[idk_rows]))]
    else:
        van_rows = van_rows[_random_order(ids[van_rows], params.seed)]
        idk_rows = idk_rows[_random_order(ids[idk_rows], params.seed)]

    n_van, n_idk = len(van_rows), len(idk_rows)
    if size is None:
        total = _largest_fillable(n_van, n_idk, params.idk_share)
        if total == 0 and n_van + n_idk > 0:
            warnings.append(
                f"craft: {task}: {n_van} vanilla and {n_idk} IdK candidates cannot fill any "
                f"row at idk_share={params.idk_share}; nothing kept"
            )
    else:
        total = size
    quota_idk = _half_up(total * params.idk_share)
    quota_van = total - quota_idk
    code_mcq = params.fidelity == "code" and task == "mcq"
    for label, order, quota in ((VANILLA, van_rows, quota_van), (IDK, idk_rows, quota_idk)):
        what = f"{label} candidates"
        if code_mcq and sigma_all is not None:
            take, repeats = _fill_keep_ties(order, quota, sigma_all, what, task, params, warnings)
        elif code_mcq:
            take, repeats = _draw_with_replacement(order, quota, what, task, params, warnings)
        else:
            take, repeats = _fill(order, quota, what, task, params, warnings)
        labels[take] = label
        reasons[np.setdiff1d(order, take)] = OVER_QUOTA
        extra.extend((int(r), label) for r in repeats)
    return {
        "thresholds": {"tau_hi": hi, "tau_lo": lo},
        "candidates": {VANILLA: n_van, IDK: n_idk},
        "quota": {VANILLA: quota_van, IDK: quota_idk},
    }


def _fill(
    order: np.ndarray,
    quota: int,
    what: str,
    where: str,
    params: SelectionParams,
    warnings: list[str],
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``quota`` rows of ``order`` and, if short and allowed, repeats drawn from it."""
    take = order[:quota]
    short = quota - len(take)
    repeats = np.zeros(0, dtype=np.int64)
    if short > 0:
        message = f"craft: {where}: only {len(order)} {what} for a quota of {quota}"
        if params.replace and len(order):
            rng = np.random.default_rng(params.seed)
            repeats = order[rng.integers(0, len(order), size=short)]
            warnings.append(f"{message}; {short} drawn again with replacement (replace=True)")
        elif params.replace:
            warnings.append(f"{message}; none to draw from, kept 0")
        else:
            warnings.append(f"{message}; kept {len(order)}, no sampling with replacement")
    return take, repeats


def _fill_keep_ties(
    order: np.ndarray,
    quota: int,
    sigma: np.ndarray,
    what: str,
    where: str,
    params: SelectionParams,
    warnings: list[str],
) -> tuple[np.ndarray, np.ndarray]:
    """The code's ``nsmallest``/``nlargest(quota, keep='all')`` on a certainty-ordered pool:
    the first ``quota`` rows plus every later row tied with the last one; a short pool is
    refilled with replacement."""
    if len(order) <= quota:
        code = params.model_copy(update={"replace": True})
        return _fill(order, quota, what, where, code, warnings)
    if quota == 0:
        return order[:0], np.zeros(0, dtype=np.int64)
    boundary = sigma[order[quota - 1]]
    end = quota
    while end < len(order) and sigma[order[end]] == boundary:
        end += 1
    if end > quota:
        warnings.append(
            f"craft: {where}: {end - quota} {what} tied with the last one kept beyond the "
            f"quota of {quota} (fidelity: code, keep='all')"
        )
    return order[:end], np.zeros(0, dtype=np.int64)


def _draw_with_replacement(
    order: np.ndarray,
    quota: int,
    what: str,
    where: str,
    params: SelectionParams,
    warnings: list[str],
) -> tuple[np.ndarray, np.ndarray]:
    """The code's ``sample(quota, replace=True)``: ``quota`` draws from the pool, each row
    kept once (``take``) and every further draw of it a repeat."""
    if not len(order) or quota == 0:
        return _fill(order, quota, what, where, params, warnings)
    rng = np.random.default_rng(params.seed)
    drawn = order[rng.integers(0, len(order), size=quota)]
    _, first = np.unique(drawn, return_index=True)
    is_first = np.zeros(quota, dtype=bool)
    is_first[first] = True
    return np.sort(drawn[is_first]), drawn[~is_first]


def _all_mcq(table: pa.Table) -> bool:
    return "task" in table.column_names and pc.all(pc.equal(table.column("task"), "mcq")).as_py()


def _largest_fillable(n_van: int, n_idk: int, share: float) -> int:
    """The largest total t ≤ n_van + n_idk whose quota (round(t·share) IdK) the pools fill."""

    def fits(t: int) -> bool:
        q = _half_up(t * share)
        return q <= n_idk and t - q <= n_van

    bound = n_van + n_idk
    if share > 0:
        bound = min(bound, math.floor((n_idk + 0.5) / share))
    if share < 1:
        bound = min(bound, math.floor((n_van + 0.5) / (1 - share)) + 1)
    t = max(bound, 0)
    while t > 0 and not fits(t):
        t -= 1
    return t


def _half_up(x: float) -> int:
    """Round half up (``round`` in Python rounds half to even)."""
    return math.floor(x + 0.5 + 1e-9)


def _split_size(size: int | None, counts: list[int]) -> list[int | None]:
    """``size`` split between tasks in proportion to their rows (largest remainder)."""
    if size is None or not counts:
        return [None] * len(counts)
    total = sum(counts)
    exact = [size * c / total for c in counts]
    parts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(counts)), key=lambda i: (parts[i] - exact[i], i))
    for i in by_remainder[: size - sum(parts)]:
        parts[i] += 1
    return parts


def _random_order(ids: np.ndarray, seed: int) -> np.ndarray:
    """A seeded permutation keyed on the row ids, independent of the input row order."""
    keys = np.fromiter(
        (xxhash.xxh3_64_intdigest(f"{seed}\x1f{i}".encode()) for i in ids),
        dtype=np.uint64,
        count=len(ids),
    )
    return np.lexsort((np.arange(len(ids)), keys))


def _floats(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as float64 with nulls as NaN."""
    column = table.column(name)
    if not pa.types.is_floating(column.type):
        column = pc.cast(column, pa.float64())
    return np.asarray(column.to_numpy(), dtype=np.float64)


def _check_columns(table: pa.Table, method: str) -> None:
    needed = ["id", "task"]
    if method != "vanilla":
        needed.append(CORRECTNESS)
    if method in _USES_CERTAINTY:
        needed.append(CERTAINTY)
    if method in _USES_FLOW:
        needed.append(FLOW)
    missing = [name for name in needed if name not in table.column_names]
    if missing:
        raise ValueError(f"craft selection ({method}) needs column(s) {', '.join(missing)}")


def _sum_over(per_task: dict[str, Any], key: str) -> dict[str, int]:
    out = {VANILLA: 0, IDK: 0}
    for task_stats in per_task.values():
        for label, count in task_stats[key].items():
            out[label] += count
    return out
