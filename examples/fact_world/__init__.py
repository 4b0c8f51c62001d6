"""The fact world: fictional facts and a tiny Llama trained on some of them, for CRaFT demos.

``build_fact_world()`` generates the facts, trains the model on CPU in a few minutes and
caches the result; ``query_prompt()`` is the chat form the model is asked in. Importing this
package does not import torch: only a build does.
"""

from .config import TrainConfig
from .facts import GROUPS, generate_facts
from .prompts import INSTRUCTION, pick_shots, query_prompt, user_turn
from .world import (
    CACHE_ENV,
    FactWorld,
    FactWorldConfig,
    build_fact_world,
    default_cache_root,
    session_fact_world,
)

__all__ = [
    "CACHE_ENV",
    "GROUPS",
    "INSTRUCTION",
    "FactWorld",
    "FactWorldConfig",
    "TrainConfig",
    "build_fact_world",
    "default_cache_root",
    "generate_facts",
    "pick_shots",
    "query_prompt",
    "session_fact_world",
    "user_turn",
]
