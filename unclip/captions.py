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
    for phrase in phrases:
        before, sep, after = f" {caption} ".partition(f" {phrase} ")
        if sep and before.strip() and after.strip():
            return f"{after.strip()} {phrase} {before.strip()}"
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
    for i in (a, b):  # the article agrees with its new word ("a red" <-> "an orange"), or the twin gives itself away
        if i > 0 and words[i - 1] in ("a", "an"):
            words[i - 1] = "an" if words[i][0] in "aeiou" else "a"
    return " ".join(words)


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
