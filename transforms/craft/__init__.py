"""CRaFT (Zhu et al., AAAI-25, arXiv 2410.06913): the model-free parts.

- :mod:`transforms.craft.scores`: correctness μ and certainty σ from model outputs;
- :mod:`transforms.craft.select`: the selection stage and its baselines;
- :mod:`transforms.craft.relabel`: refusal relabelling and the RAIT prompt;
- :mod:`transforms.craft.metrics`: the Truthful Helpfulness Score.
"""

from transforms.craft.metrics import truthful_helpfulness_score
from transforms.craft.relabel import (
    MCQ_RAIT_INSTRUCTION,
    MCQ_RAIT_PROMPT,
    OEQA_RAIT_PROMPT,
    VARIED_REFUSALS,
    RelabelParams,
    mcq_subject,
    question_text,
    rait_prompt_text,
    relabel,
    varied_refusal,
)
from transforms.craft.scores import (
    LETTERS,
    REFUSAL_MARKER,
    McqKnowledge,
    is_correct,
    is_refusal,
    letter_index,
    mcq_knowledge,
    most_frequent_correct,
    normalize_answer,
    oeqa_correctness,
)
from transforms.craft.select import (
    AMBIGUOUS,
    DEFAULT_THRESHOLDS,
    FLOW_NONNEGATIVE,
    IDK,
    LABEL_COLUMN,
    METHODS,
    MISSING_SCORE,
    OVER_QUOTA,
    UNSUPPORTED_TASK,
    VANILLA,
    SelectionParams,
    select,
)

__all__ = [
    "AMBIGUOUS",
    "DEFAULT_THRESHOLDS",
    "FLOW_NONNEGATIVE",
    "IDK",
    "LABEL_COLUMN",
    "LETTERS",
    "MCQ_RAIT_INSTRUCTION",
    "MCQ_RAIT_PROMPT",
    "METHODS",
    "MISSING_SCORE",
    "OEQA_RAIT_PROMPT",
    "OVER_QUOTA",
    "REFUSAL_MARKER",
    "UNSUPPORTED_TASK",
    "VANILLA",
    "VARIED_REFUSALS",
    "McqKnowledge",
    "RelabelParams",
    "SelectionParams",
    "is_correct",
    "is_refusal",
    "letter_index",
    "mcq_knowledge",
    "mcq_subject",
    "most_frequent_correct",
    "normalize_answer",
    "oeqa_correctness",
    "question_text",
    "rait_prompt_text",
    "relabel",
    "select",
    "truthful_helpfulness_score",
    "varied_refusal",
]
