"""Self-generated data: the pure parts of Self-Instruct, SELF-GUIDE and CUT-style judgments.

- :mod:`~transforms.synthesis.rouge`: the ROUGE-L novelty filter (rouge-score semantics,
  pruned by token-overlap bounds so a pool of tens of thousands stays fast).
- :mod:`~transforms.synthesis.self_instruct`: Self-Instruct (Wang et al., ACL 2023,
  arXiv 2212.10560) seed loading, prompts, parsers and filters.
- :mod:`~transforms.synthesis.self_guide`: SELF-GUIDE (Zhao et al., 2024, arXiv 2407.12874)
  prompts and quality filters.
- :mod:`~transforms.synthesis.judge`: CUT (Xu et al., arXiv 2312.14591) judgments: the rubric
  prompt, the verdict parser and the deterministic reference judge.
- :mod:`~transforms.synthesis.lineage`: generated rows with their lineage columns.
- :mod:`~transforms.synthesis.fit`: fitting a few-shot prompt into the model's context by
  dropping its last items.

Nothing here talks to a model: the stage runners in :mod:`pipelines.synthesis` do.
"""
