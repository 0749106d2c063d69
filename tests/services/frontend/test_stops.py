"""Stop strings over streamed text: exact cuts wherever the chunks split."""

from __future__ import annotations

import pytest

from services.frontend.stops import StopMatcher, validate_stop_strings


def stream(matcher: StopMatcher, chunks: list[str]) -> tuple[str, bool, list[str]]:
    released, stopped = [], False
    for chunk in chunks:
        out = matcher.feed(chunk)
        released.append(out.text)
        if out.is_stopped:
            stopped = True
            break
    if not stopped:
        released.append(matcher.flush())
    return "".join(released), stopped, released


TEXT = "The answer is 42.\nUser: next question"


@pytest.mark.parametrize("split", range(1, len(TEXT)))
def test_stop_string_cut_at_every_split(split):
    text, stopped, _ = stream(StopMatcher(["\nUser:"]), [TEXT[:split], TEXT[split:]])
    assert (text, stopped) == ("The answer is 42.", True)


def test_every_character_its_own_chunk_never_releases_part_of_the_stop():
    text, stopped, released = stream(StopMatcher(["\nUser:", "###"]), list(TEXT))
    assert (text, stopped) == ("The answer is 42.", True)
    assert all("\n" not in piece for piece in released)


def test_text_held_back_only_while_it_could_be_a_stop():
    m = StopMatcher(["END"])
    assert m.feed("hello E").text == "hello "
    assert m.feed("x").text == "Ex"  # "Ex" can no longer become "END"
    assert m.feed(" EN").text == " "
    assert m.flush() == "EN"  # the generation ended without the stop string


def test_earliest_stop_wins_and_nothing_after_it():
    m = StopMatcher(["b", "a"])
    out = m.feed("xxabyy")
    assert (out.text, out.is_stopped) == ("xx", True)
    assert m.feed("more").text == "" and m.flush() == ""


def test_no_stop_strings_release_everything():
    m = StopMatcher([])
    assert m.feed("abc").text == "abc" and m.flush() == ""


@pytest.mark.parametrize(("stop", "field"), [
    ([""], "params.stop[0]"), (["ok", "x" * 300], "params.stop[1]"), (["s"] * 17, "params.stop"),
])
def test_invalid_stop_strings_name_the_field(stop, field):
    error = validate_stop_strings(stop)
    assert error is not None and error.startswith(field)
    assert validate_stop_strings(["ok", "\n\n"]) is None
