"""Streaming moderation: nothing that must not be emitted is emitted, whatever the chunk
boundaries, and clean text waits only while a match could still complete."""

from __future__ import annotations

import itertools

from services.safety.policy import Action, PolicySet
from services.safety.stream import StreamModerator


def run(moderator: StreamModerator, chunks: list[str]) -> tuple[str, list[str], str]:
    """(all released text, the category of each finding, the blocking category or "")."""
    out, categories = [], []
    for chunk in chunks:
        release = moderator.feed(chunk)
        out.append(release.text)
        categories += [f.category for f in release.findings]
        if release.blocked is not None:
            return "".join(out), categories, release.blocked.category
    release = moderator.flush()
    out.append(release.text)
    categories += [f.category for f in release.findings]
    return "".join(out), categories, release.blocked.category if release.blocked else ""


def splits(text: str, num_cuts: int) -> list[list[str]]:
    """Every way to cut ``text`` at ``num_cuts`` positions."""
    out = []
    for cuts in itertools.combinations(range(1, len(text)), num_cuts):
        bounds = (0, *cuts, len(text))
        out.append([text[a:b] for a, b in itertools.pairwise(bounds)])
    return out


def test_a_banned_phrase_is_never_emitted_at_any_split(repo_policies: PolicySet) -> None:
    policy = repo_policies.for_tenant("dev")
    assert policy is not None and policy.action("weapons") == Action.BLOCK
    text = "Sure. Here is how to make a pipe bomb: first"
    for chunks in [*splits(text, 1), *splits(text, 2), list(text)]:
        out, _, blocked = run(StreamModerator(policy), chunks)
        assert blocked == "weapons", chunks
        assert out == "Sure. Here is ", chunks  # the text before the phrase, nothing after
        assert "bomb" not in out and "how to" not in out


def test_an_obfuscated_banned_phrase_is_cut_too(repo_policies: PolicySet) -> None:
    policy = repo_policies.default
    text = "ok: h0w t0 m4ke a p\u200bipe b0mb"
    for chunks in splits(text, 1):
        out, _, blocked = run(StreamModerator(policy), chunks)
        assert blocked == "weapons"
        assert out == "ok: "


def test_a_card_number_is_redacted_at_every_split(repo_policies: PolicySet) -> None:
    policy = repo_policies.default
    assert policy.action("pii.card") == Action.REDACT
    text = "Card 4111 1111 1111 1111, thanks."
    for chunks in [*splits(text, 1), *splits(text, 2), list(text)]:
        out, categories, blocked = run(StreamModerator(policy), chunks)
        assert out == "Card [CARD], thanks.", chunks
        assert categories == ["pii.card"] and not blocked


def test_each_released_piece_leaks_no_digit_of_the_card(repo_policies: PolicySet) -> None:
    moderator = StreamModerator(repo_policies.default)
    released = [moderator.feed(ch).text for ch in "pay with 5500 0000 0000 0004 now"]
    released.append(moderator.flush().text)
    assert "".join(released) == "pay with [CARD] now"
    assert not any(ch.isdigit() for piece in released for ch in piece)


def test_an_email_split_anywhere_is_redacted(repo_policies: PolicySet) -> None:
    text = "Write to jane.doe@example.org today"
    for chunks in splits(text, 1):
        out, _, _ = run(StreamModerator(repo_policies.default), chunks)
        assert out == "Write to [EMAIL] today"


def test_a_luhn_invalid_number_passes_unchanged(repo_policies: PolicySet) -> None:
    text = "Order 4111 1111 1111 1112 shipped."
    out, categories, _ = run(StreamModerator(repo_policies.default), list(text))
    assert out == text and categories == []


def test_clean_text_is_held_back_only_while_a_match_could_complete(
        repo_policies: PolicySet) -> None:
    """Fed one character at a time, prose is released word by word: what is held back
    is never more than the words a pattern could still be matching."""
    moderator = StreamModerator(repo_policies.default)
    text = ("The weather today is sunny with a light breeze from the west, and the "
            "forecast for tomorrow looks much the same. Enjoy the afternoon outside. ")
    released = ""
    max_held = 0
    for ch in text:
        released += moderator.feed(ch).text
        max_held = max(max_held, len(moderator.pending))
        assert text.startswith(released + moderator.pending)
    released += moderator.flush().text
    assert released == text
    assert max_held <= 16  # a word or two ("how to ..." could begin a banned phrase)


def test_a_sentence_end_releases_everything_before_it(repo_policies: PolicySet) -> None:
    moderator = StreamModerator(repo_policies.default)
    release = moderator.feed("All good here. ")
    assert release.text == "All good here. " and moderator.pending == ""


def test_an_endless_partial_match_is_held_at_most_max_hold_chars(
        repo_policies: PolicySet) -> None:
    moderator = StreamModerator(repo_policies.default, max_hold_chars=64)
    released = ""
    for _ in range(50):
        released += moderator.feed("abcdefgh.").text  # could always be an e-mail's start
        assert len(moderator.pending) <= 64
    assert len(released) >= 50 * 9 - 64


def test_after_a_block_nothing_more_is_released(repo_policies: PolicySet) -> None:
    moderator = StreamModerator(repo_policies.default)
    assert moderator.feed("You should kill yourself now").blocked is not None
    assert moderator.feed(" more text").text == ""
    assert moderator.flush().text == ""


def test_each_release_says_how_much_of_the_text_fed_it_stands_for(
        repo_policies: PolicySet) -> None:
    """Summed, the releases account for every character fed: redacted or not, up to a
    block (then the text before its match)."""
    text = "Card 4111 1111 1111 1111, thanks."
    for chunks in [*splits(text, 1), list(text)]:
        moderator = StreamModerator(repo_policies.default)
        releases = [moderator.feed(chunk) for chunk in chunks] + [moderator.flush()]
        assert sum(r.num_raw_chars for r in releases) == len(text), chunks
        assert all(r.num_raw_chars == len(r.text) for r in releases
                   if not r.findings), chunks  # unredacted: the text as fed
    moderator = StreamModerator(repo_policies.for_tenant("dev"))
    blocked = moderator.feed("Sure. Here is how to make a pipe bomb: first")
    assert blocked.blocked is not None
    assert (blocked.text, blocked.num_raw_chars) == ("Sure. Here is ", len("Sure. Here is "))
