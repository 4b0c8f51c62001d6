"""The Truthful Helpfulness Score (THS) of a refusal-aware model against its initial model.

Zhu et al., CRaFT, AAAI-25, arXiv 2410.06913, §5.2 and Fig. 7. Each test question is
answered correctly (rate Pc), wrongly (Pw) or refused. With E1 = (Pc1, Pw1) the initial
model and E2 = (Pc2, Pw2) the refined one, THS is the cross product OE2 × OE1 over the best
possible one OA × OE1 (A = (1, 0): all correct), in percent:

    THS = (Pc2·Pw1 − Pw2·Pc1) / Pw1 × 100

Positive when E2 lies below the line OE1 (fewer errors per correct answer than M0), 100 for
a model that is always right, negative for one worse than M0. Table 2 of the paper is
reproduced, e.g. Llama-3-8B-Instruct on MMLU, Init-Basic (66.8, 33.1) vs CRaFT (53.3, 9.6)
→ 34.0.
"""

from __future__ import annotations


def truthful_helpfulness_score(
    pc1: float, pw1: float, pc2: float, pw2: float, *, percent: bool = False
) -> float:
    """THS in percent of the refined model (pc2, pw2) against the initial one (pc1, pw1).

    Args:
        pc1, pw1: correct and wrong rates of the initial model.
        pc2, pw2: correct and wrong rates of the refined model.
        percent: the rates are percentages in [0, 100] instead of fractions in [0, 1].

    Raises:
        ValueError: a rate is outside its range, or pw1 = 0 (THS is undefined for an
            initial model that makes no errors).
    """
    top = 100.0 if percent else 1.0
    rates = {"pc1": pc1, "pw1": pw1, "pc2": pc2, "pw2": pw2}
    for name, value in rates.items():
        if not 0.0 <= value <= top:
            raise ValueError(f"{name}={value} is outside [0, {top:g}]")
    pc1, pw1, pc2, pw2 = (value / top for value in rates.values())
    if pw1 == 0:
        raise ValueError("THS is undefined when the initial model makes no errors (pw1 = 0)")
    return (pc2 * pw1 - pw2 * pc1) / pw1 * 100.0
