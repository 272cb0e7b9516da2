"""``text-grammar``: seeded phrase-grammar utterances per label. NOT a language model.

The offline CPU default for text (the embedded demo and the tests). Each utterance is assembled from small
hand-written phrase banks: ``[opener] core [tail]``, where the core may name a topic and a person, then a
style is applied. Every choice is drawn from ``numpy.random.default_rng(row seed)`` (retries use the next
attempt seed, see :mod:`gptfl_ray.generate.text_common`), so the same seed gives the same text.

- **Banks** exist for MELD's seven emotions (neutral, joy, surprise, anger, sadness, disgust, fear) and its three
  sentiments (positive = joy's bank plus milder positives; negative = anger + sadness + disgust + fear), found by
  label name, then by label text (``labels.text``), case-insensitive, with common aliases ("happy" -> joy,
  "angry" -> anger, ...). Any other label gets a generic bank whose cores say the label text itself ("I feel
  so {label} right now."): the label word is then the only signal, so a real LLM (``text-llm``) is the better
  choice for such labels.
- **Domains** (``options.domains``) supply the topics: sitcom, workplace, family, school.
- **Styles** (``options.styles``): plain, addressed (a name), hesitant ("Um, ... ..."), casual ("Yeah, ..."),
  emphatic ("!").

Outputs are cleaned, length-bounded, de-duplicated within a shard and retried as every text generator's are
(``min_words``, ``max_words``, ``max_attempts``).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from gptfl_ray.generate.registry import register
from gptfl_ray.generate.text_common import TextGenerator, TextOptions

Bank = dict[str, tuple[str, ...]]  # "openers", "cores", "tails"

BANKS: dict[str, Bank] = {
    "neutral": {
        "openers": ("", "So,", "Okay,", "Well,", "Alright,", "Hey,", "Anyway,", "By the way,"),
        "cores": (
            "I'll meet you at {topic} around eight.",
            "did you call about {topic}?",
            "we need to talk about {topic} tomorrow.",
            "I think {topic} starts at seven.",
            "can you pass me the remote?",
            "I was just going to grab some coffee.",
            "{name} said she'd be back in ten minutes.",
            "the keys are on the counter.",
            "let me check my calendar for {topic}.",
            "I'm heading out to {topic} now.",
            "what time is it?",
            "we should probably order some food.",
            "I put your stuff by the door.",
            "it's the second door on the left.",
            "I talked to {name} about {topic} this morning.",
            "do you want to sit here or over there?",
        ),
        "tails": ("", "Okay?", "Just so you know.", "See you later.", "Thanks.", "Right?"),
    },
    "joy": {
        "openers": ("", "Oh my God,", "Yes!", "Wow,", "Aw,", "Yay!", "Oh, wow,", "Ha!"),
        "cores": (
            "this is the best {topic} ever!",
            "I can't believe we actually pulled off {topic}!",
            "I'm so happy for you, {name}!",
            "that's wonderful news!",
            "I love this so much!",
            "we did it!",
            "you guys are amazing!",
            "this is going to be so much fun!",
            "I got the job!",
            "{topic} was perfect, absolutely perfect.",
            "I haven't laughed this hard in years!",
            "you just made my whole week!",
            "that's the sweetest thing anyone's ever done for me.",
            "I'm so excited about {topic}!",
            "everything is finally working out!",
            "this calls for a celebration!",
        ),
        "tails": ("", "I love you guys!", "This is so great!", "Thank you so much!", "Best day ever!"),
    },
    "surprise": {
        "openers": ("", "What?", "Whoa,", "Wait,", "Oh my God,", "No way,", "Huh?", "Really?"),
        "cores": (
            "you're getting married?",
            "{name} did what?",
            "since when do you care about {topic}?",
            "I had no idea!",
            "you're kidding me, right?",
            "how did you even find out about {topic}?",
            "when did this happen?",
            "you mean {name} knew the whole time?",
            "I did not see that coming!",
            "is that really you?",
            "you cancelled {topic}?",
            "are you serious right now?",
            "you two are together?",
            "that was you?",
            "{topic} is tonight?",
        ),
        "tails": ("", "Seriously?", "Are you sure?", "Since when?", "Unbelievable!", "Wow."),
    },
    "anger": {
        "openers": (
            "",
            "Are you kidding me?",
            "Seriously?",
            "Oh, come on!",
            "Unbelievable.",
            "Hey!",
            "Enough!",
        ),
        "cores": (
            "I told you a hundred times not to touch my stuff!",
            "you completely ruined {topic}!",
            "how could you do this to me, {name}?",
            "stop lying to me!",
            "I am so sick of this!",
            "get out of my apartment!",
            "don't you dare walk away from me!",
            "this is the last time I cover for you!",
            "you had one job!",
            "who do you think you are?",
            "I can't believe you went behind my back about {topic}!",
            "that is completely unacceptable!",
            "you never listen to me!",
            "I'm done making excuses for {name}!",
            "leave me alone!",
        ),
        "tails": ("", "I mean it!", "Get out!", "Unbelievable!", "Do you hear me?", "I'm serious!"),
    },
    "sadness": {
        "openers": ("", "I don't know,", "Honestly,", "I just...", "Oh,", "Yeah,", "I guess"),
        "cores": (
            "I really thought {topic} would work out.",
            "I miss {name} so much.",
            "nobody even remembered my birthday.",
            "I just feel so alone right now.",
            "she's gone, and she's not coming back.",
            "I didn't get the job.",
            "it's over between us.",
            "I can't stop crying.",
            "everything I touch falls apart.",
            "maybe I'm just not good enough.",
            "I messed up {topic}, and it's all my fault.",
            "I wish things could go back to the way they were.",
            "he didn't even say goodbye.",
            "I really miss the old days.",
            "I don't think I can do this anymore.",
        ),
        "tails": (
            "",
            "I'm sorry.",
            "It just hurts.",
            "I really tried.",
            "What's the point?",
            "I need a minute.",
        ),
    },
    "disgust": {
        "openers": ("", "Ew,", "Ugh,", "Gross!", "Eww!", "Oh, yuck,", "Oh God,"),
        "cores": (
            "that is disgusting!",
            "what is that smell?",
            "get that thing away from me!",
            "I can't believe you ate that.",
            "there's hair in my food.",
            "don't ever touch me with those hands again.",
            "that's the grossest thing I've ever seen.",
            "you licked it?",
            "I think I'm going to throw up.",
            "how can you live like this?",
            "please tell me you washed that.",
            "{name}'s apartment is a pigsty.",
            "the food at {topic} was revolting.",
            "that's just wrong on so many levels.",
        ),
        "tails": ("", "Gross.", "Ugh.", "Seriously, gross!", "I'm gonna be sick.", "No, thank you."),
    },
    "fear": {
        "openers": ("", "Oh no,", "Oh God,", "Shh,", "Please,", "Help!", "Wait,", "Um,"),
        "cores": (
            "did you hear that?",
            "I think someone's in the apartment.",
            "what if they find out about {topic}?",
            "I'm scared, {name}.",
            "please don't leave me here alone.",
            "I can't do {topic}, I'm terrified.",
            "something's wrong, I can feel it.",
            "what if it doesn't work?",
            "I don't want to die!",
            "there's something under the bed.",
            "we're gonna get caught!",
            "what was that noise?",
            "I'm so nervous about {topic}.",
            "don't open that door!",
            "what if {name} never comes back?",
        ),
        "tails": ("", "I'm scared.", "Please hurry!", "What do we do?", "Oh God, oh God.", "I can't look."),
    },
}
_MILD_POSITIVE: Bank = {
    "openers": ("", "Thanks,", "Oh,", "Hey,", "Aw,"),
    "cores": (
        "that's really nice of you.",
        "I'm glad you came, {name}.",
        "{topic} went really well.",
        "you look great today.",
        "I think this is going to work.",
        "that sounds like a good plan.",
        "I'm proud of you.",
        "it was so good to see you.",
    ),
    "tails": ("", "Really.", "I mean it.", "Thank you."),
}


def _merge(*banks: Bank) -> Bank:
    return {
        part: tuple(dict.fromkeys(p for b in banks for p in b[part]))
        for part in ("openers", "cores", "tails")
    }


BANKS["positive"] = _merge(BANKS["joy"], _MILD_POSITIVE)
BANKS["negative"] = _merge(BANKS["anger"], BANKS["sadness"], BANKS["disgust"], BANKS["fear"])
GENERIC: Bank = {  # any other label: the cores say its text
    "openers": ("", "Honestly,", "Okay,", "Well,", "You know,", "Look,", "Oh,"),
    "cores": (
        "I feel so {label} right now.",
        "this is all about {label}, isn't it?",
        "there's a lot of {label} in this room.",
        "{topic} was pure {label}.",
        "talk about {label}!",
        "I'd call that {label}, {name}.",
        "everything about {topic} says {label} to me.",
        "that's {label}, plain and simple.",
        "I can't stop thinking about {label}.",
        "if I had to pick one word for {topic}, it'd be {label}.",
    ),
    "tails": ("", "Right?", "Seriously.", "You know what I mean?", "That's all."),
}
ALIASES = {
    "happy": "joy",
    "happiness": "joy",
    "joyful": "joy",
    "surprised": "surprise",
    "angry": "anger",
    "mad": "anger",
    "sad": "sadness",
    "disgusted": "disgust",
    "scared": "fear",
    "afraid": "fear",
    "fearful": "fear",
    "none": "neutral",
    "no emotion": "neutral",
    "pos": "positive",
    "neg": "negative",
}
DOMAINS: dict[str, tuple[str, ...]] = {
    "sitcom": (
        "the coffee house",
        "the apartment",
        "the party",
        "this date",
        "the wedding",
        "Thanksgiving",
        "the audition",
        "the trip to Vegas",
    ),
    "workplace": (
        "the meeting",
        "the presentation",
        "the quarterly report",
        "the new project",
        "the interview",
        "the office party",
        "the deadline",
        "the client call",
    ),
    "family": (
        "dinner",
        "the holidays",
        "Mom's birthday",
        "the kids' recital",
        "the family reunion",
        "the move",
        "the barbecue",
        "Grandma's visit",
    ),
    "school": (
        "the exam",
        "the group project",
        "prom",
        "the lecture",
        "the dorm",
        "graduation",
        "the essay",
        "the field trip",
    ),
}
NAMES = ("Sam", "Alex", "Jess", "Mike", "Dana", "Chris", "Pat", "Nina", "Leo", "Rosa")
Style = Literal["plain", "addressed", "hesitant", "casual", "emphatic"]
STYLES: tuple[str, ...] = ("plain", "addressed", "hesitant", "casual", "emphatic")
_HESITATIONS = ("Um,", "Uh,", "I mean,", "Well, um,")
_CASUAL = ("Yeah,", "Dude,", "Man,", "Listen,")


class TextGrammarOptions(TextOptions):
    # Topic sets and styles, one of each drawn per candidate.
    domains: list[str] = Field(default_factory=lambda: list(DOMAINS), min_length=1)
    styles: list[Style] = Field(default_factory=lambda: list(STYLES), min_length=1)
    max_attempts: int = Field(50, ge=1)

    @field_validator("domains")
    @classmethod
    def _known_domains(cls, value: list[str]) -> list[str]:
        unknown = [d for d in value if d not in DOMAINS]
        if unknown:
            raise ValueError(f"unknown domain(s) {unknown} (known: {', '.join(DOMAINS)})")
        return value


def bank_for(label_name: str, label_text: str) -> tuple[str, Bank]:
    """(bank name, bank) for a label: by name, then by text, case-insensitive, aliases included."""
    for key in (label_name, label_text):
        k = " ".join(str(key).split()).casefold()
        k = ALIASES.get(k, k)
        if k in BANKS:
            return k, BANKS[k]
    return "generic", GENERIC


def compose(bank: Bank, label_text: str, domains: list[str], styles: list[str], rng: np.random.Generator):
    """One utterance and what was drawn for it (every draw from ``rng``, in a fixed order)."""

    def pick(options):
        return options[int(rng.integers(len(options)))]

    domain, style = pick(domains), pick(styles)
    opener, core, tail = pick(bank["openers"]), pick(bank["cores"]), pick(bank["tails"])
    name = pick(NAMES)
    core = core.format(topic=pick(DOMAINS[domain]), name=name, label=label_text)
    words = [p for p in (opener, core, tail) if p]
    text = " ".join(words)
    if style == "addressed":
        text = f"{name}, {_lower_first(text)}" if rng.random() < 0.5 else _before_final(text, f", {name}")
    elif style == "hesitant":
        text = f"{pick(_HESITATIONS)} {_lower_first(text)}"
        text = text[:-1] + "..." if text.endswith(".") and not text.endswith("...") else text
    elif style == "casual":
        text = f"{pick(_CASUAL)} {_lower_first(text)}"
    elif style == "emphatic":
        text = text[:-1] + "!" if text.endswith(".") and not text.endswith("...") else text
    return _sentence_case(text), {"domain": domain, "style": style}


_PROPER_TOPICS = tuple(t for topics in DOMAINS.values() for t in topics if t[0].isupper())
_KEEP_CAPITAL = ("I ", "I'", *(f"{n} " for n in NAMES), *(f"{n}'" for n in NAMES), *_PROPER_TOPICS)


def _lower_first(text: str) -> str:
    """Lower-case the first letter, unless the text starts with "I", a name or a proper-noun topic."""
    return text if text.startswith(_KEEP_CAPITAL) else text[:1].lower() + text[1:]


def _before_final(text: str, insert: str) -> str:
    """Insert before the final punctuation mark(s)."""
    stripped = text.rstrip(".!?")
    return stripped + insert + text[len(stripped) :]


def _sentence_case(text: str) -> str:
    """Capital first letter, and capitals after a sentence end inside the text."""
    chars = list(text)
    cap = True
    for i, ch in enumerate(chars):
        if cap and ch.isalpha():
            chars[i] = ch.upper()
            cap = False
        elif ch in ".!?" and (i + 1 == len(chars) or chars[i + 1] == " "):
            cap = not (ch == "." and i >= 2 and text[i - 2 : i + 1] == "...")  # "I just... nobody" stays
    return "".join(chars)


@register
class TextGrammarGenerator(TextGenerator):
    """Seeded phrase-grammar utterances (not an LLM): see the module docstring."""

    name = "text-grammar"
    default_model_id = "phrase-grammar (not an LLM)"
    Options = TextGrammarOptions

    def candidates(self, rows, attempt):
        o: TextGrammarOptions = self.options  # type: ignore[assignment]
        out: list[tuple[str | None, dict[str, Any]]] = []
        for row in rows:
            bank_name, bank = bank_for(row["label_name"], row["label_text"])
            rng = np.random.default_rng(int(row["seed"]))
            text, info = compose(bank, str(row["label_text"]), o.domains, list(o.styles), rng)
            out.append((text, {**info, "bank": bank_name}))
        return out
