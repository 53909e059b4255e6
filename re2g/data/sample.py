"""The sample knowledge task: a seeded, synthetic knowledge-intensive task in exactly the KILT formats.

It is the embedded default for the demo and every test. ``generate_sample(out_dir, cfg)`` writes::

    out_dir/
      sample.json                      manifest (kind "sample", re2g.artifacts): config, size profile, counts,
                                       examples, file list (deterministic)
      knowledge_source.jsonl           KILT pages {"_id", "wikipedia_id", "wikipedia_title", "text": [title, p1, ...]}
      entities.jsonl                   the ground truth: name, split, facts, paragraph of each fact
      tasks/{task}-{split}-kilt.jsonl  task in slot_filling | qa | fact_verification, split in train | dev | test
      tokenizers/wordpiece/            BERT WordPiece (AutoTokenizer.from_pretrained loads it)
      tokenizers/bpe/                  BART byte-level BPE

**The world.** Invented people, each with one page. Names are syllable combinations drawn from a seeded
``random.Random``; first-name and last-name pools are much smaller than the number of people, so many
share a first or a last name, and some last names are near-duplicates of others (one syllable
changed). Each person has six facts (relations): place of birth, year of birth, occupation, employer,
country of citizenship, educated at. Places, countries, organizations and universities are invented
too and shared by many people (organizations and universities are often named after places or
family names, one more source of word overlap). A page is the title paragraph (KILT's paragraph 0)
plus a few content paragraphs; each fact is stated in exactly one paragraph, with one of several
paraphrase templates per relation ("was born in", "hails from", "is a native of", ...), and the
paragraphs are filled up with filler sentences that mention other places, organizations, years and
other people (colleagues, relatives with the same last name, namesakes with the same first name).

**The tasks** (KILT task files): ``slot_filling`` (``"Name [SEP] place of birth"`` -> value, as T-REx
and zsRE), ``qa`` (questions worded unlike the passages: "Where was X born?"), ``fact_verification``
(a claim -> ``SUPPORTS``/``REFUTES``; two claims per person, one of each label; a refuted claim uses
the value of a namesake where there is one). Every answer's provenance is the paragraph that states
the fact (for REFUTES: the paragraph that contradicts the claim). People are split by entity into
train/dev/test (``train_fraction``/``dev_fraction``), so dev and test people never occur in a training
query (zero-shot, as zsRE). BM25 finds the right page by the name but must pick the paragraph by
relation words that are paraphrased; namesakes and mentions in other pages are its hard negatives.

**Sizes** (``n_entities`` overrides the number of people):

====== ======== ==================== =============== =================================================
size   people   content paragraphs   words/paragraph  tasks
====== ======== ==================== =============== =================================================
tiny   120      4-6 per page         30-70           all tasks and splits (~500 passages)
demo   1,200    4-6 per page         30-70           all tasks and splits (~5,000 passages)
bench  350,000  exactly 3 per page   52-80           dev split of 500 dev people only
====== ======== ==================== =============== =================================================

Passage arithmetic for ``bench`` (the splitter makes passages of at most ``max_words`` = 100 words,
closes one once it has ``min_words`` = 50, and skips paragraph 0): every content paragraph has 52-94
words, so each paragraph fills exactly one passage by itself and two never share one (52 + 52 > 100):
350,000 pages x 3 paragraphs = 1,050,000 passages (:func:`expected_passages`; checked against
``re2g.data.passages.split_page`` on a 2,000-page bench sample: 6,000 passages).
That is ~74M words, ~500 MB of JSONL (~45 s on one core here); the tokenizers are trained on the first
20,000 pages.

**Why one module (~900 lines).** Most of it is one seeded generator: the relation templates and word
pools (data), the world, the page text and the task records draw from three ``random.Random`` streams
in a fixed order, and "same config, byte-identical files" rests on that order; split across modules,
a change in one would silently reorder draws made in another. What is not the generator (the summary,
the manifest, the atomic output directory: :mod:`re2g.artifacts`) is short and is the writer's own.
"""

from __future__ import annotations

import json
import math
import random
import string
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from re2g.artifacts import KINDS, Manifest, read_manifest, staged_dir, write_manifest
from re2g.config import SampleConfig
from re2g.errors import ArtifactError, ConfigError

KIND = "sample"
SUMMARY_FILE = KINDS[KIND].file
KNOWLEDGE_SOURCE = "knowledge_source.jsonl"
ENTITIES_FILE = "entities.jsonl"
TASKS = ("slot_filling", "qa", "fact_verification")
SPLITS = ("train", "dev", "test")
LABELS = ("SUPPORTS", "REFUTES")

RELATIONS = ("place_of_birth", "date_of_birth", "occupation", "employer",
             "country_of_citizenship", "educated_at")
#: the slot-filling wording of each relation (as in T-REx / zsRE inputs ``"Entity [SEP] relation"``)
RELATION_LABELS = {
    "place_of_birth": "place of birth",
    "date_of_birth": "date of birth",
    "occupation": "occupation",
    "employer": "employer",
    "country_of_citizenship": "country of citizenship",
    "educated_at": "educated at",
}


def task_file(task: str, split: str) -> str:
    """Relative path of a task file inside a sample directory."""
    return f"tasks/{task}-{split}-kilt.jsonl"


# --------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class SizeProfile:
    """How big a sample is and how its pages are shaped."""

    n_entities: int
    min_paragraphs: int          # content paragraphs per page (paragraph 0, the title, not counted)
    max_paragraphs: int
    min_words: int               # every content paragraph has at least this many words
    max_words: int               # paragraph word targets are drawn from [min_words, max_words]
    task_splits: tuple[str, ...]
    max_task_entities: int | None  # per split: queries for at most this many people (None: all)
    tokenizer_pages: int | None    # tokenizers train on the first N pages' text (None: all)


PROFILES: dict[str, SizeProfile] = {
    "tiny": SizeProfile(120, 4, 6, 30, 70, SPLITS, None, None),
    "demo": SizeProfile(1_200, 4, 6, 30, 70, SPLITS, None, None),
    "bench": SizeProfile(350_000, 3, 3, 52, 80, ("dev",), 500, 20_000),
}


def size_profile(cfg: SampleConfig) -> SizeProfile:
    """The size profile of ``cfg`` with ``n_entities`` applied."""
    prof = PROFILES[cfg.size]
    if cfg.n_entities is not None:
        prof = replace(prof, n_entities=cfg.n_entities)
    return prof


def expected_passages(cfg: SampleConfig, max_words: int = 100) -> int:
    """A lower bound on the passages of this sample's knowledge source, for a splitter whose passages
    hold at most ``max_words`` words and skip the title paragraph (``re2g.data.passages``).

    Any such splitter makes at least ``ceil(words / max_words)`` passages per page. When every
    content paragraph has more than ``max_words / 2`` words (``bench``: 52-94 of 100), no passage
    can hold two paragraphs, so a page gives at least one passage per paragraph (exactly one under
    ``split_page``'s rule): 350,000 pages x 3 paragraphs -> 1,050,000 for ``bench``.
    """
    prof = size_profile(cfg)
    if 2 * prof.min_words > max_words:
        per_page = prof.min_paragraphs
    else:
        per_page = math.ceil(prof.min_paragraphs * prof.min_words / max_words)
    return prof.n_entities * per_page


def estimate_passages(paragraph_words: list[int], min_words: int = 50, max_words: int = 100) -> int:
    """Passages of one page (content paragraphs' word counts) under the rule of
    ``re2g.data.passages.split_page``: fill a passage word by word across paragraphs, never past
    ``max_words``, and close it as soon as it has ``min_words``; the page's rest is one more."""
    n = buf = 0
    for w in paragraph_words:
        pos = 0
        while pos < w:
            take = min(max_words - buf, w - pos)
            buf += take
            pos += take
            if buf >= min_words:
                n, buf = n + 1, 0
    return n + (buf > 0)


# --------------------------------------------------------------------------- vocabulary of the world

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "kr", "st", "tr", "th", "sh", "ch", "gr", "vel", "h", "j")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou", "ei")
_CODAS = ("", "", "", "", "", "", "n", "r", "l", "s", "m")
_SYLLABLES = tuple(o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS)
_ONSET_OF = {o + v + c: o for o in reversed(_ONSETS) for v in _VOWELS for c in _CODAS}
_PLACE_SUFFIXES = ("", "", "", "ton", "stad", "holm", "ford", "vik", "burg", "mouth", "dal", "ora")
_COUNTRY_SUFFIXES = ("ia", "ia", "ia", "land", "stan", "mark")

OCCUPATIONS = (
    "chemist", "painter", "architect", "botanist", "engineer", "cartographer", "composer",
    "historian", "physician", "novelist", "sculptor", "astronomer", "economist", "linguist",
    "mathematician", "photographer", "geologist", "journalist", "lawyer", "pharmacist", "surveyor",
    "violinist", "poet", "diplomat", "librarian", "zoologist", "playwright", "navigator",
    "watchmaker", "translator", "archaeologist", "meteorologist", "glassblower", "bookbinder",
    "shipwright", "printer", "philosopher", "teacher", "banker", "agronomist")
TOPICS = (
    "river ecology", "medieval trade routes", "glass making", "coastal mapping", "folk music",
    "railway history", "seed banks", "tidal energy", "old manuscripts", "urban gardens",
    "bridge design", "weather records", "migratory birds", "clock mechanisms", "paper conservation",
    "salt production", "mountain villages", "ancient coins", "textile dyes", "lighthouse keeping",
    "beekeeping", "early printing", "harbour engineering", "soil chemistry", "star catalogues",
    "wind instruments", "pottery glazes", "forest management", "dialect studies", "maritime law",
    "public libraries", "water mills", "children's literature", "trade unions", "crop rotation",
    "volcanic islands", "orchard cultivation", "cheese making", "map projections", "silver mining")
HOBBIES = ("chess", "sailing", "mountain walking", "bird watching", "amateur astronomy", "gardening",
           "rowing", "fencing", "woodcarving", "stamp collecting", "fishing", "cycling")
_ORG_FORMS = ("{w} Institute", "{w} Works", "{l} Foundation", "Bank of {p}", "{p} Museum",
              "{w} Press", "{w} Laboratories", "{p} Railway Company", "{l} and {w}",
              "{p} Observatory", "{w} Trading House", "{p} Shipyards", "{l} Brothers")
_UNIV_FORMS = ("University of {p}", "{p} College", "{w} Academy", "{p} Polytechnic",
               "{w} School of Arts", "Royal College of {p}")
_AWARD_FORMS = ("{w} Prize", "{p} Medal", "Order of {w}", "{l} Award")

# --------------------------------------------------------------------------- sentence templates
# Fields: {s} subject at a sentence start ("Ana Kelvo", "Kelvo", "She"), {sl} mid-sentence ("she"),
# {sp}/{spl} possessive ("Kelvo's", "Her"/"her"), {pos} possessive pronoun, {obj} object pronoun,
# {v} the value, {av} the value with its article.

FACT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "place_of_birth": (
        "{s} was born in {v}.",
        "{s} hails from {v}.",
        "{s} is a native of {v}.",
        "{sp} hometown is {v}, where {pos} family lived for generations.",
        "A native of {v}, {sl} spent {pos} youth there.",
        "{s} first saw the light of day in {v}.",
        "The town of {v} is where {sl} was born.",
    ),
    "date_of_birth": (
        "{s} was born in {v}.",
        "{s} was born in the year {v}.",
        "{sp} birth was recorded in {v}.",
        "{s} came into the world in {v}.",
        "{sp} life began in {v}.",
        "Born in {v}, {sl} belonged to a generation shaped by rapid change.",
    ),
    "occupation": (
        "{s} works as {av}.",
        "{s} is {av} by training.",
        "{s} made a living as {av}.",
        "{s} pursued a career as {av}.",
        "By profession, {sl} is {av}.",
        "{sp} profession is that of {av}.",
    ),
    "employer": (
        "{s} is employed by {v}.",
        "{s} works for {v}.",
        "{s} joined the staff of {v}.",
        "{s} took a permanent position at {v}.",
        "{sp} employer is {v}.",
        "For many years {sl} has been on the payroll of {v}.",
    ),
    "country_of_citizenship": (
        "{s} is a citizen of {v}.",
        "{s} holds citizenship of {v}.",
        "{s} carries a passport issued by {v}.",
        "{sp} nationality is that of {v}.",
        "{s} became a naturalized citizen of {v}.",
    ),
    "educated_at": (
        "{s} studied at {v}.",
        "{s} graduated from {v}.",
        "{s} was educated at {v}.",
        "{s} earned a degree from {v}.",
        "{sp} alma mater is {v}.",
        "As a student, {sl} attended {v}.",
    ),
}
#: both birth facts in one sentence (used when they fall into the same paragraph)
BIRTH_TEMPLATES = (
    "{s} was born in {place} in {year}.",
    "Born in {place} in {year}, {sl} grew up there.",
)
# (template, starts with the subject): only subject-first templates may open a paragraph
FILLER_TEMPLATES: tuple[tuple[str, bool], ...] = (
    ("{s} published a study on {topic} in {year}.", True),
    ("{s} has given lectures on {topic} in {place}.", True),
    ("{s} is known for a lifelong interest in {topic}.", True),
    ("{s} later moved to {place} and stayed there for {num} years.", True),
    ("{s} travelled widely across {country} during {year}.", True),
    ("{s} served on the board of {org} for a short time.", True),
    ("{s} received the {award} in {year}.", True),
    ("{s} wrote {num} books, the best known of which concerns {topic}.", True),
    ("{s} spent the summer of {year} in {place}.", True),
    ("{s} once gave a lecture at {univ} on {topic}.", True),
    ("{s} is remembered for a long essay about {topic}.", True),
    ("{s} kept detailed notebooks on {topic} for most of {pos} life.", True),
    ("{sp} early work dealt mostly with {topic}.", True),
    ("{sp} papers on {topic} are kept in an archive in {place}.", True),
    ("{sp} reputation grew steadily after {year}.", True),
    ("In {year}, {sl} published a short book on {topic}.", False),
    ("Outside of work, {sl} enjoys {hobby}.", False),
    ("Critics have praised {spl} writing on {topic}.", False),
    ("Visitors to {place} can still see a plaque that honours {obj}.", False),
    ("A portrait of {obj} hangs in the hall of {org}.", False),
    # mentions of other people
    ("{s} was a close friend of {other}.", True),
    ("{s} worked alongside {other} for several years.", True),
    ("{s} first met {other} in {place}.", True),
    ("{s} was a student of {other}.", True),
    ("{s} often collaborated with {other} on projects about {topic}.", True),
    ("{s} corresponded for many years with {other}.", True),
    ("Together with {other}, {sl} founded a society devoted to {topic}.", False),
    ("{other} described {obj} as one of the most gifted people of {pos} generation.", False),
    ("According to {other}, {sl} had a remarkable memory for {topic}.", False),
    ("Many of {spl} letters to {other} survive.", False),
    ("{other} and {sl} shared an office for a decade.", False),
    ("A rivalry with {other} shaped {spl} later years.", False),
)
RELATIVE_TEMPLATES = (
    "{s} is a cousin of {other}.",
    "{s} is a distant relative of {other}.",
    "{s} shares a family name and a grandfather with {other}.",
)
QA_TEMPLATES: dict[str, tuple[str, ...]] = {
    "place_of_birth": ("Where was {n} born?", "What is the birthplace of {n}?",
                       "In which town was {n} born?", "Which place is {n} originally from?"),
    "date_of_birth": ("In what year was {n} born?", "When was {n} born?",
                      "What is the birth year of {n}?"),
    "occupation": ("What is {n}'s occupation?", "What does {n} do for a living?",
                   "What is the profession of {n}?", "What kind of work does {n} do?"),
    "employer": ("Who employs {n}?", "Which organization does {n} work for?",
                 "Where is {n} employed?", "What is the name of {n}'s employer?"),
    "country_of_citizenship": ("Which country is {n} a citizen of?", "What is the nationality of {n}?",
                               "Of which country does {n} hold citizenship?"),
    "educated_at": ("Where did {n} study?", "Which institution did {n} attend?",
                    "What is {n}'s alma mater?", "Where was {n} educated?"),
}
CLAIM_TEMPLATES: dict[str, tuple[str, ...]] = {
    "place_of_birth": ("{n} was born in {v}.", "{n}'s birthplace is {v}.", "{n} comes from {v}."),
    "date_of_birth": ("{n} was born in {v}.", "The birth year of {n} is {v}.",
                      "{n} was born in the year {v}."),
    "occupation": ("{n} is {av}.", "{n} earns a living as {av}.", "{n} works as {av}."),
    "employer": ("{n} works for {v}.", "{n} is employed by {v}.", "{v} employs {n}."),
    "country_of_citizenship": ("{n} is a citizen of {v}.", "{n} has citizenship of {v}.",
                               "{n} is a national of {v}."),
    "educated_at": ("{n} studied at {v}.", "{n} is a graduate of {v}.", "{n} attended {v}."),
}

_FIELDS_CACHE: dict[str, tuple[str, ...]] = {}


def _fields(template: str) -> tuple[str, ...]:
    got = _FIELDS_CACHE.get(template)
    if got is None:
        got = tuple(f for _, f, _, _ in string.Formatter().parse(template) if f)
        _FIELDS_CACHE[template] = got
    return got


def _pick(rng: random.Random, seq):
    """``rng.choice(seq)``, several times faster (one ``random()`` call); deterministic for a seed."""
    return seq[int(rng.random() * len(seq))]


def _randint(rng: random.Random, a: int, b: int) -> int:
    return a + int(rng.random() * (b - a + 1))


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


# --------------------------------------------------------------------------- the world


@dataclass
class _World:
    """Everything drawn before the pages: pools of names and values, and each person's facts."""

    first_names: list[str]
    last_names: list[str]
    genders: list[int]               # per first name: 0 she, 1 he
    places: list[str]
    countries: list[str]
    place_country: list[int]
    orgs: list[str]
    univs: list[str]
    awards: list[str]
    # per person (index = entity id)
    first: list[int]
    last: list[int]
    facts: list[tuple[int, int, int, int, int, int]]  # place, year, occupation, org, country, univ
    by_first: dict[int, list[int]]
    by_last: dict[int, list[int]]
    split_of: list[str]

    def name(self, e: int) -> str:
        return f"{self.first_names[self.first[e]]} {self.last_names[self.last[e]]}"

    def value(self, e: int, rel: str) -> str:
        return self.value_of(rel, self.facts[e][RELATIONS.index(rel)])

    def value_of(self, rel: str, code: int) -> str:
        if rel == "place_of_birth":
            return self.places[code]
        if rel == "date_of_birth":
            return str(code)
        if rel == "occupation":
            return OCCUPATIONS[code]
        if rel == "employer":
            return self.orgs[code]
        if rel == "country_of_citizenship":
            return self.countries[code]
        return self.univs[code]

    def pool_size(self, rel: str) -> int:
        return {"place_of_birth": len(self.places), "occupation": len(OCCUPATIONS),
                "employer": len(self.orgs), "country_of_citizenship": len(self.countries),
                "educated_at": len(self.univs)}[rel]


def _words(rng: random.Random, count: int, used: set[str], min_syl: int, max_syl: int,
           suffixes: tuple[str, ...] = ("",)) -> list[tuple[str, tuple[str, ...]]]:
    """``count`` new capitalized words (unique within ``used``), with their syllables."""
    out: list[tuple[str, tuple[str, ...]]] = []
    while len(out) < count:
        syl = tuple(rng.choice(_SYLLABLES) for _ in range(rng.randint(min_syl, max_syl)))
        word = ("".join(syl) + rng.choice(suffixes)).capitalize()
        if word not in used and len(word) >= 4:
            used.add(word)
            out.append((word, syl))
    return out


def _near_duplicates(rng: random.Random, base: list[tuple[str, tuple[str, ...]]], count: int,
                     used: set[str]) -> list[str]:
    """``count`` words that differ from a word of ``base`` in the vowel or ending of one syllable
    (similar-name distractors: "Kelvo" -> "Kalvo")."""
    out: list[str] = []
    tries = 0
    while len(out) < count and tries < 20 * count + 100:
        tries += 1
        _, syl = base[rng.randrange(len(base))]
        i = rng.randrange(len(syl))
        new = syl[:i] + (_ONSET_OF[syl[i]] + rng.choice(_VOWELS) + rng.choice(_CODAS),) + syl[i + 1:]
        word = "".join(new).capitalize()
        if word not in used:
            used.add(word)
            out.append(word)
    return out


def _unique_forms(rng: random.Random, count: int, forms: tuple[str, ...], used: set[str],
                  places: list[str], lasts: list[str]) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        form = rng.choice(forms)
        w = _words(rng, 1, used, 1, 2)[0][0] if "{w}" in form else ""
        name = form.format(w=w, p=rng.choice(places), l=rng.choice(lasts))
        if name not in used:
            used.add(name)
            out.append(name)
    return out


def _split_counts(n: int, cfg: SampleConfig) -> tuple[int, int, int]:
    n_train = int(round(n * cfg.train_fraction))
    n_dev = int(round(n * cfg.dev_fraction))
    n_test = n - n_train - n_dev
    if min(n_train, n_dev, n_test) < 1:
        raise ConfigError(
            f"data.sample: train_fraction={cfg.train_fraction}, dev_fraction={cfg.dev_fraction} with "
            f"{n} entities leave train/dev/test = {n_train}/{n_dev}/{n_test}: expected at least one each "
            "(train_fraction + dev_fraction < 1)")
    return n_train, n_dev, n_test


def _build_world(n: int, cfg: SampleConfig, rng: random.Random) -> _World:
    used: set[str] = set()
    n_first = max(6, n // 6)
    n_last = max(8, n // 3)
    firsts = _words(rng, n_first, used, 2, 2)
    genders = [rng.randrange(2) for _ in firsts]
    n_near = n_last // 4
    lasts_syl = _words(rng, n_last - n_near, used, 2, 3)
    lasts = [w for w, _ in lasts_syl] + _near_duplicates(rng, lasts_syl, n_near, used)
    rng.shuffle(lasts)
    places = [w for w, _ in _words(rng, max(8, n // 8), used, 1, 2, _PLACE_SUFFIXES)]
    countries = [w for w, _ in _words(rng, max(4, min(60, n // 25)), used, 2, 2, _COUNTRY_SUFFIXES)]
    place_country = [rng.randrange(len(countries)) for _ in places]
    orgs = _unique_forms(rng, max(6, n // 10), _ORG_FORMS, used, places, lasts)
    univs = _unique_forms(rng, max(4, n // 20), _UNIV_FORMS, used, places, lasts)
    awards = _unique_forms(rng, max(4, min(2000, n // 40)), _AWARD_FORMS, used, places, lasts)

    first: list[int] = []
    last: list[int] = []
    seen: set[tuple[int, int]] = set()
    while len(first) < n:
        pair = (rng.randrange(len(firsts)), rng.randrange(len(lasts)))
        if pair not in seen:
            seen.add(pair)
            first.append(pair[0])
            last.append(pair[1])
    facts = []
    for _ in range(n):
        place = rng.randrange(len(places))
        country = place_country[place] if rng.random() < 0.7 else rng.randrange(len(countries))
        facts.append((place, rng.randint(1820, 1995), rng.randrange(len(OCCUPATIONS)),
                      rng.randrange(len(orgs)), country, rng.randrange(len(univs))))
    by_first: dict[int, list[int]] = {}
    by_last: dict[int, list[int]] = {}
    for e in range(n):
        by_first.setdefault(first[e], []).append(e)
        by_last.setdefault(last[e], []).append(e)

    n_train, n_dev, _ = _split_counts(n, cfg)
    order = list(range(n))
    rng.shuffle(order)
    split_of = ["test"] * n
    for i, e in enumerate(order):
        split_of[e] = "train" if i < n_train else ("dev" if i < n_train + n_dev else "test")
    return _World([w for w, _ in firsts], lasts, genders, places, countries, place_country,
                  orgs, univs, awards, first, last, facts, by_first, by_last, split_of)


def wikipedia_id(e: int) -> str:
    """The KILT ``wikipedia_id`` (and ``_id``) of person ``e``."""
    return str(1_000_000 + e)


# --------------------------------------------------------------------------- pages


def _other(w: _World, e: int, rng: random.Random) -> tuple[int, bool]:
    """Someone ``e``'s page mentions: a namesake (same last or first name) when there is one."""
    r = rng.random()
    group = w.by_last[w.last[e]] if r < 0.4 else (w.by_first[w.first[e]] if r < 0.65 else None)
    if group is not None and len(group) > 1:
        o = _pick(rng, group)
        if o != e:
            return o, w.last[o] == w.last[e]
    n = len(w.first)
    o = int(rng.random() * (n - 1))
    o = o + 1 if o >= e else o
    return o, w.last[o] == w.last[e]


def _page(w: _World, e: int, prof: SizeProfile,
          rng: random.Random) -> tuple[list[str], list[int], tuple[int, ...]]:
    """One person's page: (KILT text paragraphs incl. the title, content paragraph word counts,
    paragraph id of each relation's fact)."""
    first = w.first_names[w.first[e]]
    last = w.last_names[w.last[e]]
    full = f"{first} {last}"
    he = w.genders[w.first[e]]
    pron, obj, pos = ("he", "him", "his") if he else ("she", "her", "her")
    k = _randint(rng, prof.min_paragraphs, prof.max_paragraphs)
    slots: list[list[int]] = [[] for _ in range(k)]
    cap = max(2, math.ceil(len(RELATIONS) / k) + 1)
    for r in rng.sample(range(len(RELATIONS)), len(RELATIONS)):
        j = int(rng.random() * k)
        while len(slots[j]) >= cap:
            j = (j + 1) % k
        slots[j].append(r)
    fact_par = [0] * len(RELATIONS)
    f = w.facts[e]
    born = f[1]
    values = (w.places[f[0]], str(f[1]), OCCUPATIONS[f[2]], w.orgs[f[3]], w.countries[f[4]], w.univs[f[5]])

    def subj(opening: bool, first_paragraph: bool = False) -> dict[str, str]:
        if opening:
            ref = full if first_paragraph or rng.random() < 0.6 else last
            return {"s": ref, "sl": ref, "sp": ref + "'s", "spl": ref + "'s", "pos": pos, "obj": obj}
        r = rng.random()
        if r < 0.6:
            return {"s": pron.capitalize(), "sl": pron, "sp": pos.capitalize(), "spl": pos,
                    "pos": pos, "obj": obj}
        ref = last if r < 0.88 else full
        return {"s": ref, "sl": ref, "sp": ref + "'s", "spl": ref + "'s", "pos": pos, "obj": obj}

    def filler(kw: dict[str, str], opening: bool) -> str:
        while True:
            tpl, subject_first = _pick(rng, FILLER_TEMPLATES)
            if subject_first or not opening:
                break
        need = _fields(tpl)
        if "other" in need:
            o, relative = _other(w, e, rng)
            if relative and rng.random() < 0.5:
                tpl, need = _pick(rng, RELATIVE_TEMPLATES), ("s", "other")
            kw["other"] = w.name(o)
        for name in need:
            if name == "topic":
                kw[name] = _pick(rng, TOPICS)
            elif name == "year":
                kw[name] = str(born + _randint(rng, 16, 80))
            elif name == "place":
                kw[name] = _pick(rng, w.places)
            elif name == "num":
                kw[name] = str(_randint(rng, 2, 30))
            elif name == "country":
                kw[name] = _pick(rng, w.countries)
            elif name == "org":
                kw[name] = _pick(rng, w.orgs)
            elif name == "univ":
                kw[name] = _pick(rng, w.univs)
            elif name == "award":
                kw[name] = _pick(rng, w.awards)
            elif name == "hobby":
                kw[name] = _pick(rng, HOBBIES)
        return tpl.format_map(kw)

    text = [full]
    words: list[int] = []
    for j, rels in enumerate(slots):
        pid = j + 1
        sentences: list[str] = []
        rels = list(rels)
        if 0 in rels and 1 in rels and rng.random() < 0.5:     # both birth facts in one sentence
            rels.remove(0)
            rels.remove(1)
            kw = subj(True, j == 0)
            kw.update(place=values[0], year=values[1])
            sentences.append(_pick(rng, BIRTH_TEMPLATES).format_map(kw))
            fact_par[0] = fact_par[1] = pid
        for r in rels:
            tpls = FACT_TEMPLATES[RELATIONS[r]]
            kw = subj(not sentences, j == 0)
            v = values[r]
            kw["v"] = v
            kw["av"] = _article(v)
            sentences.append(_pick(rng, tpls).format_map(kw))
            fact_par[r] = pid
        n_words = sum(s.count(" ") + 1 for s in sentences)
        target = _randint(rng, prof.min_words, prof.max_words)
        while n_words < target:
            opening = not sentences
            s = filler(subj(opening, j == 0), opening)
            sentences.append(s)
            n_words += s.count(" ") + 1
        body = sentences[1:]          # the opening sentence names the person; the rest in any order
        rng.shuffle(body)
        text.append(" ".join(sentences[:1] + body))
        words.append(n_words)
    return text, words, tuple(fact_par)


# --------------------------------------------------------------------------- tasks


def _provenance(w: _World, e: int, pid: int) -> dict[str, Any]:
    return {"wikipedia_id": wikipedia_id(e), "title": w.name(e),
            "start_paragraph_id": pid, "end_paragraph_id": pid}


def _wrong_value(w: _World, e: int, rel: str, rng: random.Random) -> str:
    """A false value for a refuted claim: preferably a namesake's value (a plausible confusion)."""
    r = RELATIONS.index(rel)
    true = w.facts[e][r]
    if rel == "date_of_birth":
        return str(true + rng.choice((-1, 1)) * rng.randint(1, 40))
    for group in (w.by_last[w.last[e]], w.by_first[w.first[e]]):
        cands = [w.facts[o][r] for o in group if o != e and w.facts[o][r] != true]
        if cands and rng.random() < 0.7:
            return w.value_of(rel, cands[rng.randrange(len(cands))])
    code = rng.randrange(w.pool_size(rel) - 1)
    return w.value_of(rel, code + 1 if code >= true else code)


def _task_records(w: _World, people: list[int], fact_pars: list[tuple[int, ...]],
                  rng: random.Random) -> dict[str, list[dict[str, Any]]]:
    """KILT records of the three tasks for ``people`` (ids are unique across tasks and splits)."""
    out: dict[str, list[dict[str, Any]]] = {t: [] for t in TASKS}
    for e in people:
        name = w.name(e)
        wid = wikipedia_id(e)
        for r, rel in enumerate(RELATIONS):
            v = w.value(e, rel)
            prov = [_provenance(w, e, fact_pars[e][r])]
            out["slot_filling"].append({
                "id": f"sf-{wid}-{rel}", "input": f"{name} [SEP] {RELATION_LABELS[rel]}",
                "output": [{"answer": v, "provenance": prov}]})
            q = QA_TEMPLATES[rel]
            out["qa"].append({
                "id": f"qa-{wid}-{rel}", "input": q[rng.randrange(len(q))].format(n=name),
                "output": [{"answer": v, "provenance": prov}]})
        r1, r2 = rng.sample(range(len(RELATIONS)), 2)
        first_label = rng.randrange(2)
        for r, label in ((r1, LABELS[first_label]), (r2, LABELS[1 - first_label])):
            rel = RELATIONS[r]
            v = w.value(e, rel) if label == "SUPPORTS" else _wrong_value(w, e, rel, rng)
            c = CLAIM_TEMPLATES[rel]
            claim = c[rng.randrange(len(c))].format(n=name, v=v, av=_article(v))
            out["fact_verification"].append({
                "id": f"fv-{wid}-{rel}", "input": claim,
                "output": [{"answer": label, "provenance": [_provenance(w, e, fact_pars[e][r])]}]})
    return out


# --------------------------------------------------------------------------- summary


@dataclass
class SampleSummary:
    """What a sample directory holds (also stored in its ``sample.json``)."""

    out_dir: str
    size: str
    seed: int
    entities: int
    pages: int
    paragraphs: int                      # content paragraphs (the title paragraphs not counted)
    words: int                           # words in content paragraphs
    expected_passages: int               # guaranteed minimum (see expected_passages)
    estimated_passages: int              # split_page's 50..100-word rule, simulated (see estimate_passages)
    queries: dict[str, dict[str, int]]   # task -> split -> count
    entities_per_split: dict[str, int]
    examples: list[dict[str, str]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    vocab: dict[str, int] = field(default_factory=dict)   # tokenizer -> actual vocabulary size
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SampleSummary":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def table(self):
        """A rich renderable: counts, queries per task and split, and examples."""
        from rich.console import Group
        from rich.table import Table

        t = Table(title=f"sample task ({self.size}, seed {self.seed}): {self.out_dir}", show_header=False)
        t.add_column("what", style="bold")
        t.add_column("count", justify="right")
        t.add_row("entities (pages)", f"{self.entities:,}")
        t.add_row("  train / dev / test", " / ".join(f"{self.entities_per_split.get(s, 0):,}" for s in SPLITS))
        t.add_row("content paragraphs", f"{self.paragraphs:,}")
        t.add_row("words", f"{self.words:,}")
        t.add_row("passages (est. / min)", f"{self.estimated_passages:,} / {self.expected_passages:,}")
        if self.vocab:
            t.add_row("tokenizer vocab", ", ".join(f"{k} {v:,}" for k, v in self.vocab.items()))
        if self.seconds:
            t.add_row("seconds", f"{self.seconds:.1f}")

        q = Table(title="queries")
        q.add_column("task", style="bold")
        for s in SPLITS:
            q.add_column(s, justify="right")
        for task in self.queries or TASKS:      # the sample's own tasks (vital-articles: vital_qa)
            q.add_row(task, *(f"{self.queries.get(task, {}).get(s, 0):,}" for s in SPLITS))

        x = Table(title="examples")
        for col in ("task", "input", "answer"):
            x.add_column(col, overflow="fold")
        for ex in self.examples:
            x.add_row(ex["task"], ex["input"], ex["answer"])
        return Group(t, q, x)


def load_sample_summary(out_dir: str | Path, cfg: SampleConfig | None = None,
                        vocab_size: int | None = None) -> SampleSummary | None:
    """The summary of an existing sample directory, or None when there is none, it is incomplete,
    or it was made with a different config than ``cfg`` (or tokenizer ``vocab_size``, when given)."""
    try:
        meta = read_manifest(out_dir, KIND).to_dict()  # a sample from before the one schema is mapped
    except ArtifactError:
        return None
    if cfg is not None and meta.get("config") != cfg.model_dump(mode="json"):
        return None
    if vocab_size is not None and meta.get("vocab_size") != vocab_size:
        return None
    if not all((Path(out_dir) / f["path"]).is_file() for f in meta.get("files", [])):
        return None
    return SampleSummary.from_dict({**meta["summary"], "out_dir": str(out_dir)})


# --------------------------------------------------------------------------- generation


def _dump(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def commit_sample(tmp: Path, meta: dict[str, Any], files: list[str], summary: "SampleSummary") -> None:
    """Finish a sample written under ``tmp`` (a :func:`re2g.artifacts.staged_dir`): its manifest
    ``sample.json`` (``meta`` + every file's size) written last. Shared by the synthetic and the
    vital-articles samples."""
    counts = {"pages": summary.pages, "queries": sum(n for t in summary.queries.values() for n in t.values())}
    files_meta = [{"path": f, "bytes": (tmp / f).stat().st_size} for f in files]
    write_manifest(tmp, Manifest(kind=KIND, counts=counts, **meta, files=files_meta))
    summary.files = files + [SUMMARY_FILE]


def _pages(w: _World, prof: SizeProfile, rng: random.Random,
           progress: bool) -> Iterator[tuple[int, list[str], list[int], tuple[int, ...]]]:
    from tqdm import tqdm

    n = len(w.first)
    with tqdm(total=n, desc="sample pages", unit="page", disable=not progress, mininterval=1.0) as bar:
        for e in range(n):
            text, words, fact_par = _page(w, e, prof, rng)
            yield e, text, words, fact_par
            if (e & 1023) == 1023:
                bar.update(1024)
        bar.update(n - bar.n)


def generate_sample(out_dir: str | Path, cfg: SampleConfig, vocab_size: int = 4000, progress: bool = True,
                    overwrite: bool = False) -> SampleSummary:
    """Write the sample knowledge task for ``cfg`` into ``out_dir`` (see the module docstring) and
    return its summary. Same ``cfg`` -> byte-identical files. Writes into a temporary directory
    beside ``out_dir`` and renames it; an existing non-empty ``out_dir`` is refused
    (:class:`ArtifactError`) unless ``overwrite``. Progress bars show for sizes of 50,000+ people.
    ``cfg.source == "vital-articles"``: the real-text task instead (:func:`re2g.data.vital.generate_vital`)."""
    if cfg.source == "vital-articles":
        from re2g.data.vital import generate_vital

        return generate_vital(out_dir, cfg, vocab_size=vocab_size, progress=progress, overwrite=overwrite)
    from re2g.data.tokenizers import train_tokenizers

    t0 = time.time()
    out = Path(out_dir)
    prof = size_profile(cfg)
    n = prof.n_entities
    show = progress and n >= 50_000
    with staged_dir(out, overwrite=overwrite) as stage:
        tmp = stage.local
        rng = random.Random(f"re2g-sample-world-{cfg.seed}")
        w = _build_world(n, cfg, rng)
        page_rng = random.Random(f"re2g-sample-pages-{cfg.seed}")
        task_rng = random.Random(f"re2g-sample-tasks-{cfg.seed}")

        tok_texts: list[str] = []
        fact_pars: list[tuple[int, ...]] = []
        paragraphs = words_total = est = 0
        with open(tmp / KNOWLEDGE_SOURCE, "w", encoding="utf-8") as ks:
            buf: list[str] = []
            for e, text, words, fact_par in _pages(w, prof, page_rng, show):
                wid = wikipedia_id(e)
                buf.append(_dump({"_id": wid, "wikipedia_id": wid, "wikipedia_title": text[0], "text": text}))
                fact_pars.append(fact_par)
                paragraphs += len(words)
                words_total += sum(words)
                est += estimate_passages(words)
                if prof.tokenizer_pages is None or e < prof.tokenizer_pages:
                    tok_texts.extend(text)
                if len(buf) >= 4096:
                    ks.write("".join(buf))
                    buf.clear()
            ks.write("".join(buf))

        with open(tmp / ENTITIES_FILE, "w", encoding="utf-8") as ef:
            buf = []
            for e in range(n):
                buf.append(_dump({
                    "wikipedia_id": wikipedia_id(e), "name": w.name(e), "split": w.split_of[e],
                    "facts": {rel: w.value(e, rel) for rel in RELATIONS},
                    "fact_paragraphs": dict(zip(RELATIONS, fact_pars[e]))}))
                if len(buf) >= 4096:
                    ef.write("".join(buf))
                    buf.clear()
            ef.write("".join(buf))

        (tmp / "tasks").mkdir()
        queries: dict[str, dict[str, int]] = {t: {} for t in TASKS}
        examples: list[dict[str, str]] = []
        for split in prof.task_splits:
            people = [e for e in range(n) if w.split_of[e] == split]
            if prof.max_task_entities is not None:
                people = people[:prof.max_task_entities]
            records = _task_records(w, people, fact_pars, task_rng)
            for task in TASKS:
                recs = records[task]
                with open(tmp / task_file(task, split), "w", encoding="utf-8") as tf:
                    tf.write("".join(_dump(r) for r in recs))
                queries[task][split] = len(recs)
                for r in recs:
                    tok_texts.append(r["input"])
                    tok_texts.append(r["output"][0]["answer"])
                if recs and not any(x["task"] == task for x in examples):
                    x = recs[task_rng.randrange(len(recs))]
                    examples.append({"task": task, "split": split, "input": x["input"],
                                     "answer": x["output"][0]["answer"]})

        paths = train_tokenizers(tok_texts, tmp / "tokenizers", vocab_size)
        del tok_texts
        vocab = {}
        for kind, p in paths.items():
            vocab[kind] = len(json.loads((p / "tokenizer.json").read_text())["model"]["vocab"])

        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        per_split = {s: sum(1 for x in w.split_of if x == s) for s in SPLITS}
        summary = SampleSummary(
            out_dir=str(out), size=cfg.size, seed=cfg.seed, entities=n, pages=n, paragraphs=paragraphs,
            words=words_total, expected_passages=expected_passages(cfg), estimated_passages=est,
            queries=queries, entities_per_split=per_split, examples=examples, files=files, vocab=vocab)
        stored = summary.to_dict()
        stored.pop("out_dir")
        stored.pop("seconds")
        meta = {
            "config": cfg.model_dump(mode="json"),
            "profile": asdict(prof),
            "vocab_size": vocab_size,
            "relations": RELATION_LABELS,
            "summary": stored,
        }
        commit_sample(tmp, meta, files, summary)
    summary.seconds = round(time.time() - t0, 2)
    return summary
