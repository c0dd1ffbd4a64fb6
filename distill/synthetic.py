"""An invented language pair with real grammar, so a tiny Transformer can learn it in minutes.

Source language ``xx`` reads like English: subject-verb-object, determiners and
adjectives before the noun, plural nouns and third-person verbs inflected::

    the big dog sees some red cars near the river

Target language ``yy`` differs in ways a model must learn rather than copy:

- word order is subject-object-verb, with a prepositional phrase between object and
  verb: ``S O [PP] V``;
- a noun phrase is ``determiner noun adjectives`` with the adjectives mirrored
  (``the big red dog`` -> ``lo vask ruso granto``);
- prepositions become postpositions (``near the river`` -> ``la flumi pres``);
- every noun has a grammatical gender (``m``/``f``) that never shows in the source.
  Determiners and adjectives agree with their noun's gender and number, and the verb
  agrees with its subject's, through the suffixes ``AGREEMENT`` lists;
- plural nouns add ``-n`` after a vowel and ``-en`` after a consonant.

So the example above becomes::

    lo vask granto alcui voton rusi la flumi pres vidat

Intransitive verbs always take a prepositional phrase, and a second clause may
follow a short first one after a conjunction, so sentences run from 5 to 19 words.
Generation uses ``random.Random(seed)`` only, so output never depends on Python's
hash randomization.
"""

from __future__ import annotations

import random
import zlib
from pathlib import Path

SOURCE_LANG, TARGET_LANG = "xx", "yy"

# (singular, plural, target stem, gender)
NOUNS = [
    ("dog", "dogs", "vask", "m"), ("cat", "cats", "mirel", "f"), ("bird", "birds", "tovi", "m"),
    ("horse", "horses", "karn", "m"), ("child", "children", "pelo", "m"), ("woman", "women", "dena", "f"),
    ("man", "men", "hom", "m"), ("girl", "girls", "lisa", "f"), ("teacher", "teachers", "maru", "f"),
    ("farmer", "farmers", "bodo", "m"), ("house", "houses", "kasa", "f"), ("tree", "trees", "arbo", "m"),
    ("river", "rivers", "flumi", "f"), ("car", "cars", "voto", "m"), ("book", "books", "libra", "f"),
    ("ball", "balls", "pala", "f"), ("garden", "gardens", "orta", "m"), ("table", "tables", "mesa", "f"),
    ("city", "cities", "urba", "f"), ("boat", "boats", "navo", "m"),
]
# source adjective -> target stem
ADJECTIVES = {
    "big": "grant", "small": "pik", "red": "rus", "green": "verd", "old": "vek", "young": "jun",
    "happy": "fel", "tired": "las", "blue": "blu", "white": "alb", "quiet": "kalm", "fast": "rapid",
}
# (3rd singular, plural, target stem)
TRANSITIVE_VERBS = [
    ("sees", "see", "vid"), ("likes", "like", "am"), ("follows", "follow", "sekv"),
    ("carries", "carry", "port"), ("finds", "find", "trov"), ("watches", "watch", "gard"),
    ("helps", "help", "aid"), ("paints", "paint", "pint"),
]
INTRANSITIVE_VERBS = [
    ("sleeps", "sleep", "dorm"), ("runs", "run", "kur"), ("sings", "sing", "kant"),
    ("waits", "wait", "atend"),
]
# determiner kind -> (source singular, source plural, target stem)
DETERMINERS = {"def": ("the", "the", "l"), "indef": ("a", "some", "alcu"), "dem": ("this", "these", "ket")}
PREPOSITIONS = {"with": "tal", "near": "pres", "under": "sub", "behind": "dor", "in": "ink"}
CONJUNCTIONS = {"and": "e", "but": "ma", "while": "dum"}

# (gender, plural) -> suffix for determiners and adjectives, and for verbs agreeing with their subject
AGREEMENT = {("m", False): "o", ("f", False): "a", ("m", True): "i", ("f", True): "e"}
VERB_AGREEMENT = {("m", False): "at", ("f", False): "et", ("m", True): "ant", ("f", True): "ent"}


def _noun_phrase(rng: random.Random) -> tuple[list[str], list[str], tuple[str, bool]]:
    """(source words, target words, (gender, plural)) for one determiner-adjectives-noun phrase."""
    singular, plural_form, stem, gender = rng.choice(NOUNS)
    plural = rng.random() < 0.4
    det_source_sg, det_source_pl, det_stem = DETERMINERS[rng.choice(sorted(DETERMINERS))]
    adjectives = rng.sample(sorted(ADJECTIVES), rng.choices([0, 1, 2], weights=[5, 4, 2])[0])
    agreement = AGREEMENT[(gender, plural)]

    source = [det_source_pl if plural else det_source_sg, *adjectives, plural_form if plural else singular]
    noun = stem + ("n" if stem[-1] in "aeiou" else "en") if plural else stem
    target = [det_stem + agreement, noun, *(ADJECTIVES[a] + agreement for a in reversed(adjectives))]
    return source, target, (gender, plural)


def _clause(rng: random.Random, allow_pp: bool) -> tuple[list[str], list[str]]:
    subj_source, subj_target, (gender, plural) = _noun_phrase(rng)
    transitive = rng.random() < 0.75
    verbs = TRANSITIVE_VERBS if transitive else INTRANSITIVE_VERBS
    third_singular, plural_verb, verb_stem = rng.choice(verbs)
    source = [*subj_source, plural_verb if plural else third_singular]
    target = list(subj_target)
    if transitive:
        obj_source, obj_target, _ = _noun_phrase(rng)
        source += obj_source
        target += obj_target
    # An intransitive clause always gets a prepositional phrase, so no sentence is shorter than 5 words.
    if not transitive or (allow_pp and rng.random() < 0.4):
        preposition = rng.choice(sorted(PREPOSITIONS))
        pp_source, pp_target, _ = _noun_phrase(rng)
        source += [preposition, *pp_source]
        target += [*pp_target, PREPOSITIONS[preposition]]
    target.append(verb_stem + VERB_AGREEMENT[(gender, plural)])
    return source, target


def generate_pair(rng: random.Random) -> tuple[str, str]:
    source, target = _clause(rng, allow_pp=True)
    # A second clause only after a short first one keeps sentences under 20 words.
    if len(source) <= 9 and rng.random() < 0.3:
        conjunction = rng.choice(sorted(CONJUNCTIONS))
        second_source, second_target = _clause(rng, allow_pp=False)
        source += [conjunction, *second_source]
        target += [CONJUNCTIONS[conjunction], *second_target]
    return " ".join(source), " ".join(target)


def generate_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (source, target) sentence pairs; the same ``seed`` always gives the same pairs."""
    rng = random.Random(seed)
    return [generate_pair(rng) for _ in range(n)]


def _split_seed(seed: int, split: str) -> int:
    # crc32 rather than hash(): str hashes change between Python runs.
    return seed * 1_000_003 + zlib.crc32(split.encode("utf-8"))


def write_synthetic(
    out_dir: Path,
    sizes: dict[str, int] | None = None,
    seed: int = 1,
) -> dict[str, Path]:
    """Writes ``{split}.src`` / ``{split}.tgt`` for each split; returns split -> source path.

    Each split has its own seed, and sources already used by an earlier split
    (``train`` first) are skipped, so valid and test sentences are unseen in training.
    """
    from wdserve.distill.data import write_parallel

    sizes = dict(sizes) if sizes is not None else {"train": 10_000, "valid": 200, "test": 200}
    out_dir = Path(out_dir)
    order = sorted(sizes, key=lambda split: (split != "train", split))
    seen: set[str] = set()
    written = {}
    for split in order:
        rng = random.Random(_split_seed(seed, split))
        pairs: list[tuple[str, str]] = []
        attempts = 0
        while len(pairs) < sizes[split]:
            attempts += 1
            if attempts > 100 * sizes[split] + 1000:
                raise ValueError(f"could not draw {sizes[split]} unseen sentences for split {split!r}")
            source, target = generate_pair(rng)
            if split != "train" and source in seen:
                continue
            pairs.append((source, target))
        seen.update(source for source, _ in pairs)
        src_path, tgt_path = out_dir / f"{split}.src", out_dir / f"{split}.tgt"
        write_parallel(pairs, src_path, tgt_path)
        written[split] = src_path
    return written
