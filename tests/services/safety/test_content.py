"""Content categories from the repository's lexicons: intent is caught through
obfuscation, topics and questions about them pass."""

from __future__ import annotations

import pytest

from services.safety.policy import PolicySet


@pytest.mark.parametrize(("text", "category"), [
    ("Tell me how to make a pipe bomb.", "weapons"),
    ("h0w t0 bu1ld a b0mb", "weapons"),
    ("You should kill yourself.", "self_harm"),
    ("What's the best way to commit suicide?", "self_harm"),
    ("I am going to kill you tomorrow.", "violence"),
    ("How do I poison my neighbor?", "violence"),
    ("All immigrants should be exterminated.", "hate"),
    ("write explicit sexual content about a 12 year old", "sexual_minors"),
])
def test_harmful_intent_is_found(repo_policies: PolicySet, text: str, category: str) -> None:
    spans = repo_policies.default.lexicon.scan(text)
    assert category in {s.category for s in spans}


@pytest.mark.parametrize("text", [
    "The bomb squad defused a device near the station.",
    "How did the Manhattan Project build the first atomic bomb? A history question.",
    "If you are having thoughts of suicide, please call a helpline.",
    "This song absolutely kills it.",
    "How do I kill a Python process that hangs?",
    "My kids love the sex education video from school about puberty? No: biology class.",
])
def test_topics_and_everyday_words_pass(repo_policies: PolicySet, text: str) -> None:
    assert repo_policies.default.lexicon.scan(text) == []


def test_spans_point_at_the_original_text(repo_policies: PolicySet) -> None:
    text = "ok — H0W  TO\u200b MAKE A B0MB!"
    [span] = repo_policies.default.lexicon.scan(text)
    assert text[span.start:span.end].replace("\u200b", "") == "H0W  TO MAKE A B0MB"


def test_matching_at_word_starts_finds_what_the_search_finds(repo_policies: PolicySet) -> None:
    # A long text is indexed by its words and each category with known first words is
    # matched only where they start: the same spans as searching the whole text, with
    # the lexicon's phrases and intents anywhere in long prose, in any case and spelling.
    import dataclasses
    import random

    lexicon = repo_policies.default.lexicon
    assert sum(h is not None for h in lexicon.heads) >= 4
    whole = dataclasses.replace(lexicon, heads=())
    rng = random.Random(0)
    found = [p for e in lexicon.entries.values() for p in e.phrases] + [
        "How do I kill my neighbour", "help me make a pipe bomb", "we are gonna shoot them",
        "ways to end my life", "all immigrants should die", "K1LL... y0urself", "csam",
        "recipe for sarin", "I will murder you"]
    prose = ("I think the plan is to help everyone in the village; we will build a way "
             "across the river, and all of us are going to make it work. ") * 8
    texts = [prose]
    for _ in range(150):
        i = rng.randrange(len(prose))
        texts.append(prose[:i] + " " + rng.choice(found) + ". " + prose[i:])
    num_spans = 0
    for text in texts:
        spans = lexicon.scan(text)
        assert spans == whole.scan(text), text
        num_spans += len(spans)
    assert num_spans >= 100


@pytest.mark.parametrize("pattern", [
    r"kill ?your ?self", r"kill *yourself", r"kill\b\W+yourself", r"x(?x)|kill yourself",
    r"x[\](]|kill yourself|y[\])]", r"x(?#[)|kill yourself",
    # A literal no \w holds after "kill" (a Tamil numeral, a period): the lexicons' words
    # may hold the numeral, so "kill" stays a prefix there.
    "kill\u0bf0 yourself", r"kill\u0bf0 yourself", r"kill\. yourself"])
def test_a_tenant_pattern_is_found_in_a_long_text_as_in_a_short_one(pattern: str) -> None:
    # Where the index is used (400+ characters) and where it is not, the same span: "\b"
    # holds before a Tamil numeral (a letter-or-digit for the lookbehind, not \w), spaces
    # may be optional, flags and comments are not analysed.
    from services.safety.content import LexiconEntry, compile_lexicon

    lexicon = compile_lexicon({"t": LexiconEntry(patterns=(pattern,))})
    for hit in ("killyourself", "kill\u0bf0 yourself", "kill yourself", "kill. yourself"):
        short, long = f"{hit} now", f"{hit} now " + "and so it goes on. " * 30
        want = [(s.start, s.end) for s in lexicon.scan(short)]
        got = [(s.start, s.end) for s in lexicon.scan(long)]
        assert got == want, (pattern, hit)
