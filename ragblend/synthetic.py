"""A seeded synthetic RAG dataset that a 135M-parameter model can answer.

Every person, city and project is invented from syllable and word lists, so the model
can only answer from the passages. Sentences are short and explicit, repeat the entity
name, and questions reuse the passage's wording: SmolLM2-135M copes with that, while real
multi-hop data (MuSiQue) is mostly beyond it. Records have the MuSiQue shape plus `hops`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_ONSETS = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w"]
_VOWELS = ["a", "e", "i", "o", "u"]
_CODAS = ["", "", "", "l", "n", "r", "s", "m"]
_CITY_ENDINGS = ["mere", "ford", "holt", "wick", "dale", "port", "ton", "bury"]
_PROJECTS = [
    "Kestrel", "Juniper", "Basalt", "Lantern", "Marigold", "Cobalt", "Thistle", "Falcon",
    "Quartz", "Willow", "Harbor", "Saffron", "Granite", "Heron", "Meadow", "Ember",
    "Sparrow", "Cedar", "Onyx", "Bramble", "Pebble", "Otter", "Cinder", "Larch",
]
_TOPICS = ["river maps", "solar kites", "glass bridges", "quiet engines", "seed vaults", "paper batteries", "cloud gardens", "salt clocks"]
_HOBBIES = ["painting boats", "growing herbs", "playing chess", "baking bread", "collecting stamps", "repairing radios", "hiking", "writing poems"]
_JOBS = ["an engineer", "a chemist", "a designer", "a surveyor", "a planner", "a geologist"]
_PASSAGES_PER_RECORD = 6


@dataclass(frozen=True)
class _Person:
    name: str
    city: str
    job: str
    hobby: str


@dataclass(frozen=True)
class _Project:
    name: str
    leader: _Person
    topic: str
    members: int
    year: int


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).capitalize()


class _Names:
    """Draws invented names, never repeating one within a record."""

    def __init__(self, rng: random.Random):
        self.rng, self.used = rng, set[str]()

    def _unique(self, make) -> str:
        while (name := make()) in self.used:
            pass
        self.used.add(name)
        return name

    def person(self) -> str:
        return self._unique(lambda: f"{_word(self.rng, 2)} {_word(self.rng, 2)}")

    def city(self) -> str:
        return self._unique(lambda: _word(self.rng, 1) + self.rng.choice(_CITY_ENDINGS))

    def project(self) -> str:
        return self._unique(lambda: self.rng.choice(_PROJECTS))


def _new_person(rng: random.Random, names: _Names) -> _Person:
    return _Person(names.person(), names.city(), rng.choice(_JOBS), rng.choice(_HOBBIES))


def _new_project(rng: random.Random, names: _Names, leader: _Person) -> _Project:
    return _Project(names.project(), leader, rng.choice(_TOPICS), rng.randint(4, 40), rng.randint(1990, 2022))


def _person_text(p: _Person) -> str:
    return (
        f"{p.name} is {p.job}. {p.name} works in the city of {p.city}. "
        f"The office is near the old market in {p.city}, and the walk there takes ten minutes each morning. "
        f"In the evenings {p.name} enjoys {p.hobby}. Friends describe {p.name} as patient and careful, "
        f"someone who rarely travels far from home."
    )


def _project_text(pr: _Project) -> str:
    return (
        f"The {pr.name} project studies {pr.topic}. The leader of the {pr.name} project is {pr.leader.name}. "
        f"It started in {pr.year} and now has {pr.members} members. The team meets every Monday to test new "
        f"prototypes, and its reports are shared with other groups each spring."
    )


def _one_hop(rng: random.Random) -> dict:
    names = _Names(rng)
    people = [_new_person(rng, names) for _ in range(_PASSAGES_PER_RECORD)]
    projects = [_new_project(rng, names, people[i]) for i in range(_PASSAGES_PER_RECORD // 2)]
    texts = [_project_text(pr) for pr in projects] + [_person_text(p) for p in people[len(projects):]]
    if rng.random() < 0.5:
        target = rng.choice(projects)
        question, answer = f"Who is the leader of the {target.name} project?", target.leader.name
    else:
        target = rng.choice(people[len(projects):])
        question, answer = f"In which city does {target.name} work?", target.city
    rng.shuffle(texts)
    return _record(question, answer, texts, hops=1)


def _two_hop(rng: random.Random) -> dict:
    names = _Names(rng)
    people = [_new_person(rng, names) for _ in range(4)]
    leader, others = people[0], people[1:]
    target = _new_project(rng, names, leader)
    # Distractor projects are led by people who have no passage, so only the target chains.
    decoys = [_new_project(rng, names, _new_person(rng, names)) for _ in range(2)]
    texts = [_project_text(pr) for pr in decoys] + [_person_text(p) for p in others[:2]]
    rng.shuffle(texts)
    a, b = sorted(rng.sample(range(_PASSAGES_PER_RECORD), 2))
    while b - a < 2:
        a, b = sorted(rng.sample(range(_PASSAGES_PER_RECORD), 2))
    facts = [_project_text(target), _person_text(leader)]
    if rng.random() < 0.5:
        facts.reverse()
    texts.insert(a, facts[0])
    texts.insert(b, facts[1])
    question = f"In which city does the leader of the {target.name} project work?"
    return _record(question, leader.city, texts, hops=2)


def _record(question: str, answer: str, texts: list[str], hops: int) -> dict:
    return {"question": question, "answers": [answer], "ctxs": [{"title": "", "text": t} for t in texts], "hops": hops}


def make_synthetic(n: int, seed: int = 0) -> list[dict]:
    """`n` records, alternating single-hop and two-hop questions; same (n, seed) -> same data."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(seed)
    return [(_one_hop if i % 2 == 0 else _two_hop)(rng) for i in range(n)]
