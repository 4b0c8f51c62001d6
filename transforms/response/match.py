"""Stage ``match_distribution``: select rows whose responses look like a target set.

Users point the stage at a reference set they trust (``target_path``: any file ingest
reads) and choose a size. Two methods, both giving every row a log importance weight and
then drawing ``size`` rows without replacement by Gumbel top-k (``keys = w + Gumbel``),
as DSIR does:

- ``dsir``: Data Selection with Importance Resampling (Xie et al. 2023, arXiv 2302.03169).
  Texts become hashed unigram + bigram counts (scikit-learn ``HashingVectorizer``, 10,000
  buckets, DSIR's defaults); a bag-of-hashed-n-grams model is fitted to the target (p) and
  to the candidates (q), with add-one smoothing; ``w = Σ_j count_j (log p_j − log q_j)``.
- ``discriminative``: a logistic regression (scikit-learn), target vs candidates on the
  same hashed features (l2-normalised, classes balanced), whose logit is the log density
  ratio ``log p(x)/q(x)`` up to a constant.

Rows not selected go to ``rejected`` with reason ``not_selected:<method>``; every row
carries its ``match_log_weight``. The stage statistics report the KL divergence
``KL(target ‖ set)`` of the hashed-feature distributions before (all candidates) and after
(the selection), and histograms of response lengths (whitespace words) for the target, the
candidates and the selection. A whole-table stage: the weights are relative to all rows.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from transforms.response.lengths import prompt_plain, with_columns, word_counts
from transforms.schema import rejected
from transforms.stage import StageResult, reject_table
from transforms.text import combined

STAGE = "match_distribution"
LENGTH_BINS = (0, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class MatchParams(BaseModel):
    """Target set, size and method; DSIR's feature defaults."""

    model_config = ConfigDict(extra="forbid")
    target_path: str = Field(description="reference set: any file ingest reads")
    target_format: str | None = None
    size: float = Field(
        gt=0, description="rows to keep: a count (>= 1) or a share of the rows (< 1)"
    )
    method: Literal["dsir", "discriminative"] = "dsir"
    field: Literal["response", "prompt", "both"] = "response"
    num_buckets: int = Field(default=10_000, ge=16)
    ngram_max: int = Field(default=2, ge=1, le=5)
    smoothing: float = Field(default=1.0, gt=0)
    seed: int = 0


def texts_of(table: pa.Table, field: str) -> list[str]:
    """The text each row is matched on."""
    response = pc.fill_null(combined(table.column("response")), "")
    if field == "response":
        return response.to_pylist()
    prompt = prompt_plain(table.column("prompt"))
    if field == "prompt":
        return prompt.to_pylist()
    return pc.binary_join_element_wise(prompt, response, "\n").to_pylist()


def featurize(texts: list[str], params: MatchParams) -> Any:
    """Hashed n-gram counts (scipy CSR, ``len(texts) × num_buckets``)."""
    from sklearn.feature_extraction.text import HashingVectorizer

    vectorizer = HashingVectorizer(
        n_features=params.num_buckets,
        ngram_range=(1, params.ngram_max),
        alternate_sign=False,
        norm=None,
        lowercase=True,
    )
    return vectorizer.transform(texts)


def distribution(counts: Any, smoothing: float) -> np.ndarray:
    """Smoothed bucket probabilities from a count matrix (rows summed)."""
    total = np.asarray(counts.sum(axis=0)).ravel() + smoothing
    return total / total.sum()


def kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p ‖ q) in nats (both strictly positive)."""
    return float(np.sum(p * (np.log(p) - np.log(q))))


def log_weights(candidates: Any, target: Any, params: MatchParams) -> np.ndarray:
    """Log importance weight of each candidate row (see the module docstring)."""
    if params.method == "dsir":
        p = distribution(target, params.smoothing)
        q = distribution(candidates, params.smoothing)
        return np.asarray(candidates @ (np.log(p) - np.log(q))).ravel()
    from scipy.sparse import vstack
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import normalize

    x = normalize(vstack([target, candidates]).tocsr())
    y = np.r_[np.ones(target.shape[0]), np.zeros(candidates.shape[0])]
    model = LogisticRegression(class_weight="balanced", max_iter=1000, random_state=params.seed)
    model.fit(x, y)
    return model.decision_function(x[target.shape[0] :])


def gumbel_top_k(weights: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Indices of ``k`` rows drawn without replacement with probabilities ∝ exp(weights)."""
    rng = np.random.default_rng(seed)
    keys = weights + rng.gumbel(size=len(weights))
    return np.sort(np.argpartition(-keys, k - 1)[:k]) if k else np.zeros(0, dtype=np.int64)


def histogram(lengths: np.ndarray) -> dict[str, int]:
    """Counts of lengths in :data:`LENGTH_BINS` (the last bin is open)."""
    edges = [*LENGTH_BINS, np.inf]
    counts, _ = np.histogram(lengths, bins=edges)
    labels = [f"{a}-{b - 1}" for a, b in itertools.pairwise(LENGTH_BINS)]
    labels.append(f"{LENGTH_BINS[-1]}+")
    return dict(zip(labels, counts.tolist(), strict=True))


def read_target(params: MatchParams) -> pa.Table:
    """The reference set's rows (ingest's kept rows)."""
    from transforms.ingest import read_source

    tables = [r.kept for r in read_source(params.target_path, format=params.target_format)]
    target = pa.concat_tables(tables, promote_options="permissive")
    if target.num_rows == 0:
        raise ValueError(f"{params.target_path}: the target set has no rows")
    return target


def match_distribution(table: pa.Table, params: MatchParams, context: Any = None) -> StageResult:
    """Keep ``size`` rows drawn by importance weight toward the target distribution."""
    n = table.num_rows
    if n == 0:
        empty = with_columns(table, {"match_log_weight": pa.array([], pa.float64())})
        return StageResult(kept=empty, stats={"method": params.method, "selected": 0})
    k = min(n, int(params.size) if params.size >= 1 else round(params.size * n))
    target_table = read_target(params)
    target = featurize(texts_of(target_table, params.field), params)
    candidates = featurize(texts_of(table, params.field), params)
    weights = log_weights(candidates, target, params) if n else np.zeros(0)
    chosen = gumbel_top_k(weights, k, params.seed)
    mask = np.zeros(n, dtype=bool)
    mask[chosen] = True
    p = distribution(target, params.smoothing)
    lengths = word_counts(table.column("response"))
    stats = {
        "method": params.method,
        "target_rows": target_table.num_rows,
        "selected": int(k),
        "kl_before": kl(p, distribution(candidates, params.smoothing)),
        "kl_after": kl(p, distribution(candidates[mask], params.smoothing)),
        "length_histogram": {
            "target": histogram(word_counts(target_table.column("response"))),
            "before": histogram(lengths),
            "after": histogram(lengths[mask]),
        },
    }
    scored = with_columns(table, {"match_log_weight": pa.array(weights, pa.float64())})
    keep = pa.array(mask)
    dropped = scored.filter(pc.invert(keep))
    return StageResult(
        kept=scored.filter(keep),
        rejected=reject_table(rejected(dropped, STAGE, f"not_selected:{params.method}")),
        stats=stats,
    )
