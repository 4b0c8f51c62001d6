"""Generate the fictional fact corpus: invented people, six relations, three groups.

Every fact is one (entity, relation) pair asked as a question with alias answers. The corpus
is a pure function of its seed and sizes, so two builds with one config agree byte for byte.

Groups (docs/engines.md, "The fact world"), drawn per entity: every fact of an entity is
in its group, so how familiar a name is tells what the model knows, as popularity does for a
real model:

- ``known``: trained on often; the model answers them.
- ``unknown``: never trained on, nor (with groups per entity) is their entity; the model
  can only guess from the relation's value pool.
- ``half_known``: trained on rarely and with conflicting evidence (the answer and a
  distractor from the same pool), so the model is right only some of the time. Such weak,
  contested knowledge is what fine-tuning on *other* facts erodes: rehearsal on the facts
  the model knows moves many half-known facts' μ down (the knowledge flow CRaFT measures;
  docs/craft.md, fact world v4).

``twins`` (off by default; fact world v3) adds, for every half-known fact, a ``known`` fact of
the same relation about an entity whose name differs in its last letter, answering the
half-known fact's distractor (``twin_of`` names the half-known fact). Fine-tuning on the twin
pulls the look-alike question toward the distractor; but the twin already does so while M0
is trained, so most half-known facts start at μ = 0, where no flow can be negative
(docs/craft.md). ``entity_groups=False`` draws groups per fact instead (v3 and earlier).

Splits, for refusal-aware tuning and its evaluation (in the default world every split holds
all three groups; the model is trained on the facts of every split alike). Splits are drawn
per fact, so an entity's facts may sit in several splits: a model taught to refuse an
entity in ``rait`` may refuse its ``id`` and ``ood`` facts for that reason (docs/craft.md
counts this):

- ``rait``: the pool a RAIT dataset is curated from;
- ``id``: held-out facts of the same relations (every fifth one), the in-domain test set;
- ``ood``: every fact of the :data:`OOD_RELATIONS`, which no RAIT dataset sees, the
  out-of-domain test set.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

GROUPS: tuple[str, ...] = ("known", "unknown", "half_known")
SPLITS: tuple[str, ...] = ("rait", "id", "ood")
OOD_RELATIONS: tuple[str, ...] = ("instrument", "pet")
"""Relations held out of RAIT data: their facts are the out-of-domain test set."""
ID_EVERY = 5
"""Every ``ID_EVERY``-th fact of the other relations is held out as the in-domain test set."""

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr")
_ONSETS += ("kl", "st", "th", "sh", "gr", "tr", "qu", "h")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "io", "ei")
_CODAS = ("", "", "", "n", "r", "k", "l", "s", "th", "m")
_CITY_SUFFIXES = ("port", "holm", "ford", "mere", "gate", "wick", "dale", "burg", "stead", "haven")

PROFESSIONS = (
    "baker", "astronomer", "blacksmith", "cartographer", "potter", "weaver", "glassblower",
    "beekeeper", "shipwright", "locksmith", "tailor", "cobbler", "falconer", "brewer",
    "jeweller", "sculptor", "bookbinder", "clockmaker", "herbalist", "surveyor", "fisherman",
    "lamplighter", "innkeeper", "carpenter", "librarian", "tanner", "miller", "chandler",
    "ferryman", "architect", "navigator", "saddler", "cooper", "thatcher", "scribe", "vintner",
)  # fmt: skip
COLOURS = (
    "crimson", "scarlet", "amber", "ochre", "saffron", "olive", "emerald", "jade", "teal",
    "turquoise", "cyan", "azure", "cobalt", "indigo", "violet", "lilac", "magenta", "maroon",
    "beige", "ivory", "charcoal", "silver", "bronze", "copper", "coral", "salmon", "lavender",
    "mauve", "russet", "umber", "sepia", "vermilion", "cerulean", "periwinkle", "fuchsia", "plum",
)  # fmt: skip
INSTRUMENTS = (
    "violin", "cello", "oboe", "clarinet", "bassoon", "trumpet", "trombone", "tuba", "piano",
    "accordion", "banjo", "mandolin", "ukulele", "sitar", "zither", "dulcimer", "bagpipes",
    "harmonica", "xylophone", "marimba", "tambourine", "saxophone", "recorder", "ocarina",
    "lyre", "theremin", "glockenspiel", "harpsichord", "flute", "bugle", "cornet", "kazoo",
    "celesta", "bodhran", "koto", "balalaika",
)  # fmt: skip


@dataclass(frozen=True)
class Relation:
    """One attribute every entity may have: its question, value pool and answer aliases."""

    name: str
    template: str
    pool: tuple[str, ...]
    aliases: Callable[[str], list[str]]

    def question(self, entity: str) -> str:
        """The question that asks this relation of ``entity``."""
        return self.template.format(e=entity)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _word(rng: random.Random, n_syllables: int) -> str:
    return "".join(_syllable(rng) for _ in range(n_syllables)).capitalize()


def _invented_pool(
    rng: random.Random, size: int, make: Callable[[], str], taken: set[str]
) -> tuple[str, ...]:
    """``size`` distinct invented values, none a substring of another or of ``taken``."""
    pool: list[str] = []
    while len(pool) < size:
        value = make()
        low = value.lower()
        if len(value) < 4 or any(low in t or t in low for t in taken):
            continue
        taken.add(low)
        pool.append(value)
    return tuple(pool)


def make_relations(seed: int) -> tuple[Relation, ...]:
    """The six relations; the invented pools (cities, pet names, years) follow ``seed``."""
    rng = random.Random(f"fact-world-pools-{seed}")
    taken: set[str] = set()
    cities = _invented_pool(
        rng, 40, lambda: _word(rng, rng.choice((1, 2))) + rng.choice(_CITY_SUFFIXES).lower(), taken
    )
    pets = _invented_pool(rng, 40, lambda: _word(rng, 2), taken)
    years = tuple(str(y) for y in sorted(rng.sample(range(1650, 1950), 40)))
    relations = (
        Relation(
            "birthplace",
            "Which city was {e} born in?",
            cities,
            lambda v: [v, f"the city of {v}"],
        ),
        Relation(
            "profession",
            "What is the profession of {e}?",
            PROFESSIONS,
            lambda v: [v, f"{_article(v)} {v}"],
        ),
        Relation(
            "colour",
            "What is the favourite colour of {e}?",
            COLOURS,
            lambda v: [v, f"the colour {v}"],
        ),
        Relation(
            "founding_year",
            "In which year did {e} found their first workshop?",
            years,
            lambda v: [v, f"in {v}"],
        ),
        Relation(
            "instrument",
            "Which instrument does {e} play?",
            INSTRUMENTS,
            lambda v: [v, f"the {v}"],
        ),
        Relation(
            "pet",
            "What is the name of the pet of {e}?",
            pets,
            lambda v: [v, f"a pet called {v}"],
        ),
    )
    for rel in relations:
        _check_pool(rel.name, rel.pool)
    return relations


def _check_pool(name: str, pool: Sequence[str]) -> None:
    """A wrong value must never contain a right one, or substring grading breaks."""
    if not 20 <= len(pool) <= 40:
        raise ValueError(f"relation {name}: pool has {len(pool)} values, want 20-40")
    low = [v.lower() for v in pool]
    for i, a in enumerate(low):
        for j, b in enumerate(low):
            if i != j and a in b:
                raise ValueError(f"relation {name}: value {a!r} is inside {b!r}")


def make_entities(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct invented full names like "Varno Lidek"."""
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        name = f"{_word(rng, 2)} {_word(rng, rng.choice((2, 3)))}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def fact_id(question: str) -> str:
    """A stable id for a fact: a hash of its question (questions are unique)."""
    return hashlib.sha1(question.encode()).hexdigest()[:12]


def generate_facts(
    seed: int = 0,
    n_facts: int = 600,
    *,
    relations_per_entity: int = 3,
    known_fraction: float = 0.6,
    unknown_fraction: float = 0.2,
    twins: bool = False,
    entity_groups: bool = True,
) -> list[dict]:
    """Generate ``n_facts`` facts, deterministic for ``seed``.

    Each entity gets ``relations_per_entity`` distinct relations. A ``known_fraction`` of the
    entities are ``known``, an ``unknown_fraction`` ``unknown`` and the rest ``half_known``
    (see ``entity_groups``). Each fact is a dict with ``id``, ``entity``, ``relation``,
    ``question``, ``answers`` (aliases; the first is the canonical answer used in training),
    ``group``, ``split`` (``rait``, ``id`` or ``ood``; see the module docstring),
    ``distractor`` (for half-known facts, the wrong value from the same pool they are also
    trained with; None for the others) and ``twin_of``.

    With ``twins`` every half-known fact gets its known twin (module docstring), appended
    after the ``n_facts`` facts, in its split: the world then holds ``n_facts`` plus one fact
    per half-known one.

    With ``entity_groups`` (the default) the group belongs to the entity, not the fact: every
    fact of an entity is known, or half-known, or unknown (the fractions then count
    entities, in a seeded random order). Without it, the first ``known_fraction`` of the
    shuffled facts are known and so on, so one entity mixes groups.
    """
    if n_facts < 10:
        raise ValueError("n_facts must be at least 10")
    if not 0 <= known_fraction + unknown_fraction <= 1:
        raise ValueError("known_fraction + unknown_fraction must be within [0, 1]")
    relations = make_relations(seed)
    k = min(relations_per_entity, len(relations))
    rng = random.Random(f"fact-world-facts-{seed}")
    entities = make_entities(rng, -(-n_facts // k))
    facts: list[dict] = []
    for entity in entities:
        for rel in rng.sample(relations, k):
            value = rng.choice(rel.pool)
            distractor = rng.choice([v for v in rel.pool if v != value])
            question = rel.question(entity)
            facts.append(
                {
                    "id": fact_id(question),
                    "entity": entity,
                    "relation": rel.name,
                    "question": question,
                    "answers": rel.aliases(value),
                    "distractor": distractor,
                }
            )
    facts = facts[:n_facts]
    rng.shuffle(facts)
    if entity_groups:  # rank entities at random; every fact takes its entity's rank
        order = {entity: i for i, entity in enumerate(rng.sample(entities, len(entities)))}
        ranks, units = [order[fact["entity"]] for fact in facts], len(entities)
    else:
        ranks, units = list(range(len(facts))), len(facts)
    n_known = round(units * known_fraction)
    n_unknown = round(units * unknown_fraction)
    for rank, fact in zip(ranks, facts, strict=True):
        unknown = rank < n_known + n_unknown
        group = "known" if rank < n_known else "unknown" if unknown else "half_known"
        fact["group"] = group
        if group != "half_known":
            fact["distractor"] = None
    in_domain = 0
    for fact in facts:
        if fact["relation"] in OOD_RELATIONS:
            fact["split"] = "ood"
        else:
            fact["split"] = "id" if in_domain % ID_EVERY == 0 else "rait"
            in_domain += 1
        fact["twin_of"] = None
    if twins:
        facts += _twins(facts, {r.name: r for r in relations}, {e for e in entities})
    return facts


def twin_name(entity: str, taken: set[str]) -> str:
    """A new name differing from ``entity`` in the last letter only."""
    for letter in "aeiouyrnlst":
        name = entity[:-1] + letter
        if name != entity and name not in taken:
            return name
    raise ValueError(f"no free twin name for {entity!r}")


def _twins(facts: list[dict], relations: dict[str, Relation], taken: set[str]) -> list[dict]:
    """The known twin of every half-known fact (see the module docstring)."""
    out = []
    for fact in facts:
        if fact["group"] != "half_known":
            continue
        rel = relations[fact["relation"]]
        entity = twin_name(fact["entity"], taken)
        taken.add(entity)
        question = rel.question(entity)
        out.append(
            {
                "id": fact_id(question),
                "entity": entity,
                "relation": rel.name,
                "question": question,
                "answers": rel.aliases(fact["distractor"]),
                "distractor": None,
                "group": "known",
                "split": fact["split"],
                "twin_of": fact["id"],
            }
        )
    return out
