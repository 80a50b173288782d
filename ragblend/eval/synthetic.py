"""A seeded synthetic RAG dataset that a 135M-parameter model can answer.

Real multi-hop data (MuSiQue) is mostly beyond SmolLM2-135M, so quality comparisons between
modes would compare noise. Here every record is a small invented world of six passages (or more):
two projects, the two people who lead them (each works in a city), and unrelated cities.
Single-hop questions ask a project's leader or a person's city; two-hop questions ask the
city of a project's leader, which needs the project passage and the person passage (the
second project -> leader -> city chain is the decoy). Names come from syllable and word
lists, so the model can only answer from the passages; sentences are short, repeat the
entity name and match the question's wording. Records have the MuSiQue shape plus `hops`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

_ONSETS = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w"]
_VOWELS = ["a", "e", "i", "o", "u"]
_CODAS = ["", "", "", "l", "n", "r", "s", "m"]
_CITY_ENDINGS = ["mere", "ford", "holt", "wick", "dale", "port", "ton", "bury"]
# Project words and given names are single tokens for SmolLM2, which keeps a spelled-out
# two-hop answer ("The leader of ... is X. The city where X works is Y.") within 24 tokens.
_PROJECTS = [
    "Falcon", "Willow", "Harbor", "Cedar", "Comet", "Summit", "Maple", "Coral", "Pearl", "Copper", "Frost",
    "Spark", "Arrow", "Hammer", "Tiger", "Hawk", "Raven", "Owl", "Lily", "Ivy", "Sage", "Mint", "Basil",
    "Ginger", "Olive", "Cherry", "Lemon", "Canyon", "Glacier", "Ridge", "Crest", "Bloom",
]
_GIVEN = [
    "Anna", "Tom", "Max", "Eva", "Sam", "Leo", "Ada", "Ben", "Ivan", "Nina", "Omar", "Rosa", "Hugo", "Iris",
    "Otto", "Vera", "Paul", "Clara", "Felix", "Maya", "Noah", "Ruth", "Kurt",
]
_TOPICS = [
    "river maps", "solar kites", "glass bridges", "quiet engines", "seed vaults", "paper batteries",
    "cloud gardens", "salt clocks",
]
_HOBBIES = [
    "painting boats", "growing herbs", "playing chess", "baking bread", "collecting stamps",
    "repairing radios", "hiking", "writing poems",
]
_LANDMARKS = ["a stone bridge", "a glass tower", "a round theatre", "a canal", "an old mill"]
_CROPS = ["apples and pears", "plums", "barley", "grapes", "tulips"]
_EVENTS = ["harvest fair", "boat race", "lantern festival", "music week", "cheese market"]
_JOBS = ["an engineer", "a chemist", "a designer", "a surveyor", "a planner", "a geologist"]


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


@dataclass(frozen=True)
class _World:
    """Two project -> leader -> city chains plus two unrelated cities; every item gets a passage."""

    projects: list[_Project]
    town_passages: list[str]

    def passages(self) -> list[str]:
        leaders = [_person_text(pr.leader) for pr in self.projects]
        return [_project_text(pr) for pr in self.projects] + leaders + self.town_passages


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).capitalize()


class _Names:
    """Draws invented names; no given name, surname, city ending or project repeats within a
    record, because near-identical names are what a small model confuses most."""

    def __init__(self, rng: random.Random):
        self.rng, self.used = rng, set[str]()

    def _unique(self, make: Callable[[], str]) -> str:
        while (name := make()) in self.used:
            pass
        self.used.add(name)
        return name

    def person(self) -> str:
        given = self._unique(lambda: self.rng.choice(_GIVEN))
        return f"{given} {self._unique(lambda: _word(self.rng, 2))}"

    def city(self) -> str:
        ending = self._unique(lambda: self.rng.choice(_CITY_ENDINGS))
        return self._unique(lambda: _word(self.rng, 1) + ending)

    def project(self) -> str:
        return self._unique(lambda: self.rng.choice(_PROJECTS))


def _world(rng: random.Random, towns: int) -> _World:
    names = _Names(rng)
    projects = []
    for _ in range(2):
        leader = _Person(names.person(), names.city(), rng.choice(_JOBS), rng.choice(_HOBBIES))
        topic, members, year = rng.choice(_TOPICS), rng.randint(4, 40), rng.randint(1990, 2022)
        projects.append(_Project(names.project(), leader, topic, members, year))
    return _World(projects, [_town_text(names.city(), rng) for _ in range(towns)])


def _person_text(p: _Person) -> str:
    return (
        f"{p.name} is {p.job}. The city where {p.name} works is {p.city}. "
        f"The office of {p.name} is near the old market in {p.city}, and the walk there takes ten minutes. "
        f"In the evenings {p.name} enjoys {p.hobby}. Friends describe {p.name} as patient and careful. "
        f"{p.name} has worked in {p.city} for many years and rarely travels far from home."
    )


def _project_text(pr: _Project) -> str:
    lead = pr.leader.name
    return (
        f"The {pr.name} project studies {pr.topic}. The leader of the {pr.name} project is {lead}. "
        f"It started in {pr.year} and now has {pr.members} members. The team meets every Monday to test "
        f"new prototypes, and its reports are shared with other groups each spring. Visitors are welcome "
        f"on open days. {lead} has led the {pr.name} project since it began."
    )


def _town_text(town: str, rng: random.Random) -> str:
    landmark, crop, event = rng.choice(_LANDMARKS), rng.choice(_CROPS), rng.choice(_EVENTS)
    return (
        f"{town} is a quiet city in the hills. {town} has {landmark}, a busy market and a large public "
        f"library. Many families in {town} grow {crop}, and the {event} in {town} draws visitors every "
        f"year. The old clock tower of {town} was rebuilt after a storm, and trains to {town} run twice "
        f"an hour. The streets near the river are lined with old trees."
    )


def _one_hop(rng: random.Random, towns: int) -> dict:
    world = _world(rng, towns)
    target = rng.choice(world.projects)
    if rng.random() < 0.5:
        question, answer = f"Who is the leader of the {target.name} project?", target.leader.name
    else:
        question, answer = f"What is the city where {target.leader.name} works?", target.leader.city
    texts = world.passages()
    rng.shuffle(texts)
    return _record(question, answer, texts, hops=1)


def _two_hop(rng: random.Random, towns: int) -> dict:
    world = _world(rng, towns)
    target = world.projects[0]
    texts = world.passages()
    a, b = _project_text(target), _person_text(target.leader)
    while True:  # keep the two facts apart, with at least one passage between them
        rng.shuffle(texts)
        if abs(texts.index(a) - texts.index(b)) >= 2:
            break
    # Asking for the bridge first makes the model write "The leader of ... is X. The city where X
    # works is Y.": SmolLM2-135M answers two hops only when it spells out the middle entity.
    question = f"First find the leader of the {target.name} project. Then give the city where that leader works."
    return _record(question, target.leader.city, texts, hops=2)


def _record(question: str, answer: str, texts: list[str], hops: int) -> dict:
    ctxs = [{"title": "", "text": t} for t in texts]
    return {"question": question, "answers": [answer], "ctxs": ctxs, "hops": hops}


def make_synthetic(n: int, seed: int = 0, passages: int = 6) -> list[dict]:
    """`n` records, alternating single-hop and two-hop questions; same arguments -> same data.
    `passages` >= 6: every passage beyond the four facts is another distractor city."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if passages < 6:
        raise ValueError(f"passages must be >= 6 (four facts and two distractors), got {passages}")
    rng = random.Random(seed)
    return [(_one_hop if i % 2 == 0 else _two_hop)(rng, passages - 4) for i in range(n)]
