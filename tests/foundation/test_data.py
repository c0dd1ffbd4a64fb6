"""Corpus reading, cleaning and writing; the synthetic language pair."""

import gzip
import re

import pytest

from wdserve.distill.data import DataError, clean_pairs, read_lines, read_parallel, write_parallel
from wdserve.distill.synthetic import (
    ADJECTIVES,
    AGREEMENT,
    CONJUNCTIONS,
    NOUNS,
    TRANSITIVE_VERBS,
    VERB_AGREEMENT,
    generate_pairs,
    write_synthetic,
)


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_plain_and_gzip_files_read_the_same_lines(tmp_path):
    text = "ein Hund\r\nzwei Katzen\n\ndrei\n"
    plain = write(tmp_path / "a.de", text)
    compressed = tmp_path / "a.de.gz"
    compressed.write_bytes(gzip.compress(text.encode("utf-8")))
    disguised = tmp_path / "b.de"  # told by its magic bytes, not its name
    disguised.write_bytes(gzip.compress(text.encode("utf-8")))
    expected = ["ein Hund", "zwei Katzen", "", "drei"]
    assert read_lines(plain) == read_lines(compressed) == read_lines(disguised) == expected


def test_a_unicode_line_separator_inside_a_sentence_does_not_split_it(tmp_path):
    path = write(tmp_path / "a.txt", "one\u2028still one\ntwo\n")
    assert read_lines(path) == ["one\u2028still one", "two"]


def test_read_parallel_pairs_lines(tmp_path):
    src = write(tmp_path / "x.src", "a b\nc d\n")
    tgt = write(tmp_path / "x.tgt", "A B\nC D\n")
    assert read_parallel(src, tgt) == [("a b", "A B"), ("c d", "C D")]


def test_mismatched_line_counts_name_both_files_and_counts(tmp_path):
    src = write(tmp_path / "x.src", "a\nb\nc\n")
    tgt = write(tmp_path / "x.tgt", "A\nB\n")
    with pytest.raises(DataError, match=r"x\.src has 3 lines.*x\.tgt has 2"):
        read_parallel(src, tgt)


def test_missing_file_is_named(tmp_path):
    tgt = write(tmp_path / "x.tgt", "A\n")
    with pytest.raises(DataError, match=r"not found: .*nothere\.src"):
        read_parallel(tmp_path / "nothere.src", tgt)


def test_empty_corpus_is_an_error(tmp_path):
    src, tgt = write(tmp_path / "e.src", ""), write(tmp_path / "e.tgt", "")
    with pytest.raises(DataError, match=r"empty corpus: .*e\.src"):
        read_parallel(src, tgt)


def test_corrupt_gzip_is_named(tmp_path):
    path = tmp_path / "broken.gz"
    path.write_bytes(gzip.compress(b"hello world\n" * 50)[:30])  # truncated stream
    with pytest.raises(DataError, match=r"cannot read .*broken\.gz"):
        read_lines(path)


def test_bad_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("fine\nnaïve\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt is not UTF-8 text \(bad byte at line 2\)"):
        read_lines(path)


def test_clean_pairs_counts_each_reason():
    pairs = [
        ("a good pair", "ein gutes Paar"),
        ("   ", "leer"),                          # empty source
        ("word " * 120, "Wort " * 120),           # too many words
        ("x" * 2000, "y" * 2000),                 # too many characters
        ("one two three four five six seven", "eins"),  # ratio 7
        ("Yes.", "Ja, das tue ich."),             # 4 words against 1
        ("  padded  ", " gepolstert "),
    ]
    kept, report = clean_pairs(pairs, max_words=100, max_chars=1000, max_ratio=3.0)
    assert kept == [("a good pair", "ein gutes Paar"), ("padded", "gepolstert")]
    assert report.total == 7 and report.kept == 2
    assert report.dropped == {"empty": 1, "too long": 2, "length ratio": 2}
    assert report.summary() == "kept 2 of 7 pairs (dropped 1 empty, 2 length ratio, 2 too long)"


def test_ratio_is_not_applied_to_very_short_pairs():
    kept, report = clean_pairs([("Ja.", "Yes, I do.")], max_ratio=2.0, min_words_for_ratio=4)
    assert kept == [("Ja.", "Yes, I do.")] and report.dropped == {}


def test_write_parallel_round_trips_and_leaves_no_temporary_files(tmp_path):
    pairs = [("ä b", "c"), ("", "d")]
    write_parallel(pairs, tmp_path / "out" / "t.src", tmp_path / "out" / "t.tgt")
    assert read_parallel(tmp_path / "out" / "t.src", tmp_path / "out" / "t.tgt") == pairs
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["t.src", "t.tgt"]
    with pytest.raises(DataError, match="newline"):
        write_parallel([("two\nlines", "x")], tmp_path / "n.src", tmp_path / "n.tgt")


# ---------------------------------------------------------------- synthetic pair


def test_synthetic_pairs_are_deterministic_per_seed():
    assert generate_pairs(200, seed=5) == generate_pairs(200, seed=5)
    assert generate_pairs(200, seed=5) != generate_pairs(200, seed=6)


def test_synthetic_lengths_and_vocabulary_are_sized_for_a_tiny_model():
    pairs = generate_pairs(2000, seed=1)
    lengths = [len(source.split()) for source, _ in pairs]
    assert min(lengths) == 5 and max(lengths) <= 19
    assert len({pair for pair in pairs}) > 1900  # varied, not a handful of repeats
    assert len({w for _, target in pairs for w in target.split()}) < 300


def test_synthetic_target_is_sov_with_agreement():
    """``the N1 V the N2`` must come out as ``det N1 det N2 V`` with gender/number agreement."""
    nouns = {singular: (stem, gender) for singular, _, stem, gender in NOUNS}
    verbs = {third: stem for third, _, stem in TRANSITIVE_VERBS}
    simple = re.compile(r"^the (\w+) (\w+) the (\w+)$")
    checked = 0
    for source, target in generate_pairs(3000, seed=2):
        match = simple.match(source)
        if not match or match[1] not in nouns or match[3] not in nouns or match[2] not in verbs:
            continue  # only singular subject and object, no adjectives or phrases
        (subj, subj_gender), (obj, obj_gender) = nouns[match[1]], nouns[match[3]]
        assert target.split() == [
            "l" + AGREEMENT[(subj_gender, False)], subj,
            "l" + AGREEMENT[(obj_gender, False)], obj,
            verbs[match[2]] + VERB_AGREEMENT[(subj_gender, False)],
        ], source
        checked += 1
    assert checked >= 5


def test_synthetic_adjectives_follow_the_noun_mirrored_and_agree():
    """``the A1 A2 Ns ...`` must start ``det N-pl A2 A1`` with plural agreement, and so must the verb."""
    plurals = {plural: (stem, gender) for _, plural, stem, gender in NOUNS}
    checked = 0
    for source, target in generate_pairs(3000, seed=3):
        words = source.split()
        if words[0] != "the" or words[1] not in ADJECTIVES or words[2] not in ADJECTIVES:
            continue
        if words[3] not in plurals or set(words) & set(CONJUNCTIONS):
            continue
        stem, gender = plurals[words[3]]
        suffix = AGREEMENT[(gender, True)]
        noun = stem + ("n" if stem[-1] in "aeiou" else "en")
        expected = ["l" + suffix, noun, ADJECTIVES[words[2]] + suffix, ADJECTIVES[words[1]] + suffix]
        assert target.split()[:4] == expected, (source, target)
        assert target.split()[-1].endswith(VERB_AGREEMENT[(gender, True)]), (source, target)
        checked += 1
    assert checked >= 5


def test_write_synthetic_keeps_test_sentences_out_of_training(tmp_path):
    sizes = {"train": 300, "valid": 20, "test": 40}
    write_synthetic(tmp_path / "a", sizes=sizes, seed=4)
    write_synthetic(tmp_path / "b", sizes=sizes, seed=4)
    splits = {s: read_parallel(tmp_path / "a" / f"{s}.src", tmp_path / "a" / f"{s}.tgt") for s in sizes}
    assert {s: len(p) for s, p in splits.items()} == sizes
    train_sources = {source for source, _ in splits["train"]}
    assert not train_sources & {source for source, _ in splits["test"] + splits["valid"]}
    assert splits["test"] != splits["valid"][: len(splits["test"])]
    for name in ("train.src", "train.tgt", "test.src", "test.tgt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
