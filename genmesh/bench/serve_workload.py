"""What `genmesh bench serve` sends: conversations and when they arrive.

A workload is a list of conversations; a conversation is one or more user turns, sent
one after the other (turn k goes when turn k-1's answer has arrived), each carrying the
whole history so far. ``mixed`` is single-turn conversations of spread-out prompt
lengths; ``chat`` is multi-turn conversations that all open with the same long system
prompt, so every turn shares a prefix with its conversation's earlier turns and with every
other conversation. Everything is seeded: the same flags give the same prompts, for the
mesh and for the baseline alike.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

WORKLOADS = ("mixed", "chat")

_SUBJECTS = ["the river", "a lighthouse", "the old library", "a glacier", "the market",
             "a violin", "the harbour", "a beehive", "the orchard", "a telescope",
             "the railway", "a windmill", "the bakery", "a comet", "the garden", "a bridge"]
_VERBS = ["watches over", "remembers", "slowly changes", "hides", "welcomes", "outlasts",
          "depends on", "shapes", "echoes", "reflects"]
_OBJECTS = ["the travellers at dawn", "every winter storm", "the children of the town",
            "a forgotten map", "the distant mountains", "the morning fog",
            "the sound of bells", "an unfinished letter", "the last train home",
            "the colours of autumn"]
_TASKS = ["Summarize the passage above in two sentences.",
          "What is the main idea of the passage above?",
          "Write a short title for the passage above and explain it.",
          "List three details from the passage above.",
          "Continue the passage above with one more paragraph."]
_TOPICS = ["a trip to the mountains", "learning to bake bread", "starting a vegetable garden",
           "a first marathon", "moving to a new city", "building a bookshelf",
           "learning the guitar", "a science fair project", "planning a birthday party",
           "adopting a dog", "writing a short story", "repairing an old bicycle"]
_FOLLOW_UPS = ["Can you give me more detail on the first point?",
               "What would you do differently on a tight budget?",
               "Which of those is the most important, and why?",
               "Summarize your advice in one sentence.",
               "What mistakes do beginners usually make?",
               "How long should I expect this to take?"]
# Long enough (~90 words) that a chat's shared prefix spans several KV blocks.
SYSTEM_PROMPT = (
    "You are a patient, practical assistant for people planning personal projects. "
    "Answer in plain language, with concrete steps the reader can follow today. Keep "
    "answers short: a few sentences or a short list. When a question is vague, make a "
    "reasonable assumption, say what it is, and answer anyway. Never invent facts about "
    "the user; ask at most one clarifying question, at the end. Prefer cheap, safe and "
    "reversible options, mention costs and time when they matter, and point out the one "
    "thing most people get wrong. Be friendly, but do not pad the answer with praise.")


@dataclass(frozen=True, slots=True)
class Conversation:
    conversation_id: str  # unique within a run (level and index): no cache replays it
    system_prompt: str  # "" for none
    user_turns: tuple[str, ...]  # sent in order; each waits for the previous answer


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    name: str  # "mixed" or "chat"
    num_requests: int  # turns per level, all conversations together
    min_input_words: int = 16  # mixed: prompt lengths spread over this range (words)
    max_input_words: int = 256
    num_turns: int = 3  # chat: user turns per conversation


def _passage(rng: random.Random, num_words: int) -> str:
    words: list[str] = []
    while len(words) < num_words:
        sentence = (f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
                    .capitalize())
        words += sentence.split()
    return " ".join(words[:num_words]).rstrip(".") + "."


def input_lengths(n: int, *, min_words: int, max_words: int, rng: random.Random) -> list[int]:
    """``n`` prompt lengths (words), log-spaced over [min_words, max_words] and shuffled:
    short prompts dominate, as in chat traffic, but every length class is present."""
    if n == 1:
        return [min_words]
    lo, hi = math.log(min_words), math.log(max_words)
    lengths = [round(math.exp(lo + (hi - lo) * i / (n - 1))) for i in range(n)]
    rng.shuffle(lengths)
    return lengths


def mixed(spec: WorkloadSpec, *, tag: str, seed: int) -> list[Conversation]:
    """Single-turn requests: a passage of spread-out length, then a task about it. The
    opening line carries ``tag`` and the index, so no two prompts share a first block."""
    rng = random.Random(f"mixed/{tag}/{seed}")
    lengths = input_lengths(spec.num_requests, min_words=spec.min_input_words,
                            max_words=spec.max_input_words, rng=rng)
    return [Conversation(f"{tag}-{i}", "", (
        f"Request {tag}-{i}.\n{_passage(rng, n)}\n{rng.choice(_TASKS)}",))
        for i, n in enumerate(lengths)]


def chat(spec: WorkloadSpec, *, tag: str, seed: int) -> list[Conversation]:
    """Multi-turn conversations: ``num_requests // num_turns`` of them (at least one),
    all under SYSTEM_PROMPT; the first turn names a topic, later turns follow up."""
    rng = random.Random(f"chat/{tag}/{seed}")
    num_conversations = max(1, spec.num_requests // spec.num_turns)
    out = []
    for i in range(num_conversations):
        first = (f"Conversation {tag}-{i}. I am working on {rng.choice(_TOPICS)}. "
                 "What are the first three things I should do?")
        follow_ups = [rng.choice(_FOLLOW_UPS) for _ in range(spec.num_turns - 1)]
        out.append(Conversation(f"{tag}-{i}", SYSTEM_PROMPT, (first, *follow_ups)))
    return out


def make_workload(spec: WorkloadSpec, *, tag: str, seed: int) -> list[Conversation]:
    """The conversations of one load level; ``tag`` (e.g. the level) keeps levels apart."""
    if spec.name == "mixed":
        return mixed(spec, tag=tag, seed=seed)
    if spec.name == "chat":
        return chat(spec, tag=tag, seed=seed)
    raise ValueError(f"unknown workload {spec.name!r}; workloads: {', '.join(WORKLOADS)}")


def turn_messages(conversation: Conversation, replies: list[str]) -> list[dict[str, str]]:
    """The messages of the conversation's next turn, given the answers so far: the
    system prompt, every earlier (user, assistant) pair, then the next user turn. Turn k's
    messages start with turn k-1's messages plus its answer (the shared prefix)."""
    k = len(replies)
    messages = ([{"role": "system", "content": conversation.system_prompt}]
                if conversation.system_prompt else [])
    for user, reply in zip(conversation.user_turns[:k], replies, strict=True):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return [*messages, {"role": "user", "content": conversation.user_turns[k]}]


def poisson_arrivals(n: int, rate: float, *, seed: int) -> list[float]:
    """Send times (s from the level's start) of ``n`` arrivals of a Poisson process of
    ``rate`` per second: the first at 0, then exponential gaps -ln(1 - u) / rate with u
    from ``random.Random(seed)``. ``rate`` inf: all at once."""
    if rate <= 0:
        raise ValueError(f"a request rate must be positive, got {rate}")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    times, t = [], 0.0
    for i in range(n):
        if i:
            t += -math.log(1.0 - rng.random()) / rate
        times.append(t)
    return times
