"""Response-distribution stages (Response Tuning, An & Kim, arXiv 2410.02465) and the
instruction/response statistics (Instruction Modelling, Shi et al., arXiv 2405.14394).

One small module per part; see docs/response-distribution.md:

- :mod:`~transforms.response.rules`: ``rule_filter`` (lengths, language, repetition,
  boiler-plate, refusals of benign prompts);
- :mod:`~transforms.response.near_dedup`: ``near_dedup`` (MinHash LSH, ordered);
- :mod:`~transforms.response.semantic_dedup`: ``semantic_dedup`` (MiniLM embeddings);
- :mod:`~transforms.response.match`: ``match_distribution`` (DSIR and a discriminative
  variant);
- :mod:`~transforms.response.refusal_mix`: ``refusal_mix``;
- :mod:`~transforms.response.lengths` and :mod:`~transforms.response.stats`: token lengths
  and the dataset statistics with a loss-over-prompt recommendation.
"""
