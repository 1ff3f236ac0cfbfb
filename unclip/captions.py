"""Word rules that turn a caption into its hard-negative twins: the negatives CLIP training adds
(`unclip.clip_training`) and the captions best-of-k ranking asks the judge about (`unclip.pipeline`).
Plain string functions, so sampling imports them without the training code."""

from __future__ import annotations

from typing import Sequence


def swap_words(caption: str, swaps: Sequence[Sequence[str]]) -> str:
    """The caption with every word of each pair replaced by the other ("left" <-> "right"); words are matched
    whole, so "lefty" stays."""
    table = {}
    for a, b in swaps:
        table[a], table[b] = b, a
    return " ".join(table.get(word, word) for word in caption.split(" "))


def reorder_caption(caption: str, phrases: Sequence[str]) -> str:
    """The caption with the two sides of the first relation phrase found exchanged ("A to the left of B" ->
    "B to the left of A"); unchanged when it holds none of the phrases (matched as whole words)."""
    return paraphrase(caption, {phrase: phrase for phrase in phrases})


def paraphrase(caption: str, reverses: dict[str, str]) -> str:
    """The caption told from the other side, the same scene: the two sides of the first relation phrase found
    exchanged and the phrase replaced by its reverse ("A to the left of B" -> "B to the right of A" with
    {"to the left of": "to the right of"}); unchanged when it holds none of the phrases (matched as whole words)."""
    for phrase, reverse in reverses.items():
        before, sep, after = f" {caption} ".partition(f" {phrase} ")
        if sep and before.strip() and after.strip():
            return f"{after.strip()} {reverse} {before.strip()}"
    return caption


def exchange_words(caption: str, classes: Sequence[Sequence[str]], pick: int = 0) -> str:
    """The caption with the first two different words of one class exchanged ("a red circle above a green
    square" -> "a green circle above a red square" for the colours). Of the classes with two different words in
    the caption, `pick` chooses one (modulo their number); unchanged when no class has two (whole words)."""
    words = caption.split(" ")
    usable = []
    for group in classes:
        found = [i for i, w in enumerate(words) if w in group]
        second = next((j for j in found if words[j] != words[found[0]]), None) if found else None
        if second is not None:
            usable.append((found[0], second))
    if not usable:
        return caption
    a, b = usable[pick % len(usable)]
    words[a], words[b] = words[b], words[a]
    for i in (a, b):
        _agree_article(words, i)
    return " ".join(words)


def _agree_article(words: list[str], i: int) -> None:
    """Make the article before words[i] agree with it ("a red" <-> "an orange"), or a twin gives itself away."""
    if i > 0 and words[i - 1] in ("a", "an"):
        words[i - 1] = "an" if words[i][0] in "aeiou" else "a"


TWIN_RULES = ("swaps", "reorders", "exchanges")


def caption_twins(caption: str, rules: dict) -> list[str]:
    """The caption's hard-negative twins under word rules of the kinds the CLIP trains with: "swaps" (word pairs,
    `swap_words`), "reorders" (relation phrases, `reorder_caption`) and "exchanges" (word classes, one twin per
    class, `exchange_words`). Distinct, without the caption itself; [] when no rule applies."""
    unknown = sorted(set(rules) - set(TWIN_RULES))
    if unknown:
        raise ValueError(f"unknown twin rules {unknown} (known: {', '.join(TWIN_RULES)})")
    twins = [swap_words(caption, rules["swaps"])] if rules.get("swaps") else []
    if rules.get("reorders"):
        twins.append(reorder_caption(caption, rules["reorders"]))
    twins += [exchange_words(caption, [group]) for group in rules.get("exchanges", [])]
    return [t for t in dict.fromkeys(twins) if t != caption]


def substitute_words(caption: str, classes: Sequence[Sequence[str]]) -> list[str]:
    """Every caption made by replacing one word or phrase of a class with another of the same class ("a red circle"
    -> "a blue circle", "two ..." -> "three ...", "... above ..." -> "... below ..."), articles agreeing; distinct,
    without the caption itself. Phrases ("to the left of") are matched as whole words."""
    padded, out = f" {caption} ", []
    for group in classes:
        for old in group:
            start = padded.find(f" {old} ")
            if start < 0:
                continue
            for new in group:
                if new == old:
                    continue
                words = (padded[:start] + f" {new} " + padded[start + len(old) + 2:]).split()
                _agree_article(words, len(padded[:start].split()))  # at the new phrase's first word
                out.append(" ".join(words))
    return [c for c in dict.fromkeys(out) if c != caption]


def word_pairs(captions: Sequence[str]) -> set[tuple[str, str]]:
    """The adjacent word pairs of the captions (what `caption_negatives` keeps a negative within)."""
    return {(a, b) for c in captions for words in [c.split()] for a, b in zip(words, words[1:])}


def caption_negatives(caption: str, rules: dict, classes: Sequence[Sequence[str]] = (),
                      seen: set[tuple[str, str]] | None = None) -> list[str]:
    """Hard negatives for a caption: its twins (`caption_twins` under `rules`) and its one-word substitutions
    (`substitute_words` over `classes`). With `seen` (`word_pairs` of the training captions), only negatives whose
    adjacent word pairs all occur there: a model that meets a colour-shape pair its data holds out only as a
    negative learns to reject it (docs/MODELS.md, "A judge that never sees a held-out pair as a negative")."""
    found = [c for c in dict.fromkeys(caption_twins(caption, rules) + substitute_words(caption, classes))
             if c != caption]
    if seen is not None:
        found = [c for c in found if word_pairs([c]) <= seen]
    return found
