"""Training settings of the fact world's model (no torch import: reading them is free)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TrainConfig:
    """Model shape and optimisation settings (defaults: 3.7M parameters, ~1 min on 2 idle cores)."""

    vocab_size: int = 1024
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    max_position_embeddings: int = 512
    epochs: int = 6
    known_repeats: int = 8
    half_known_repeats: float = 1
    """Exposures of a half-known fact with its answer per epoch; a fraction is the chance of
    one more in each epoch (0.34: about 2 exposures in 6 epochs, 0 to 6 from fact to fact)."""
    distractor_repeats: float | None = None
    """Exposures with its distractor per epoch, likewise; None: ``half_known_repeats``."""
    max_shots: int = 3
    batch_size: int = 48  # exposures (turns) per batch
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.01
    threads: int = 2

    def as_dict(self) -> dict:
        """The settings as a plain dict (for hashing and the manifest)."""
        return asdict(self)
