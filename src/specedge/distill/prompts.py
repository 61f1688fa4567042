"""Training prompts for distillation, written here rather than taken from any benchmark.

`builtin_prompts` composes instruction prompts from small templates (writing, role-play,
reasoning, arithmetic, coding, extraction, science, humanities, translation, summarisation,
open questions) and fills the summarisation / extraction ones with passages from the docstrings
of Python's standard library (text that ships with every Python install). None of it comes
from the SpecBench evaluation set in `shared/data/`; the tests check there is no overlap.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import json
import random
from pathlib import Path

from specedge.errors import InvalidRequestError

TOPICS = [
    "the ocean",
    "a small bakery",
    "space exploration",
    "a rainy city",
    "friendship",
    "an old lighthouse",
    "learning to cook",
    "a mountain village",
    "electric cars",
    "a robot",
    "winter mornings",
    "a lost dog",
    "the history of tea",
    "a chess tournament",
    "gardening",
    "a night train",
    "volcanoes",
    "a school library",
    "honey bees",
    "a jazz musician",
]
FORMS = [
    "a short poem",
    "a haiku",
    "a two-paragraph story",
    "a product description",
    "a limerick",
    "a diary entry",
    "a persuasive paragraph",
    "a short speech",
    "a riddle",
    "a news headline",
]
AUDIENCES = [
    "a five-year-old",
    "a high school student",
    "a busy manager",
    "a new programmer",
    "my grandmother",
    "a tourist",
]
CONCEPTS = [
    "photosynthesis",
    "inflation",
    "gravity",
    "machine learning",
    "the water cycle",
    "compound interest",
    "DNA",
    "supply and demand",
    "black holes",
    "vaccines",
    "recursion",
    "climate change",
    "the stock market",
    "electricity",
    "plate tectonics",
    "democracy",
    "the immune system",
    "encryption",
    "evolution",
    "the internet",
]
CODE_TASKS = [
    "reverses a string",
    "checks whether a number is prime",
    "merges two sorted lists",
    "counts the words in a sentence",
    "computes the factorial of n",
    "finds the largest element of a list",
    "removes duplicates from a list while keeping order",
    "converts Celsius to Fahrenheit",
    "returns the n-th Fibonacci number",
    "checks whether a string is a palindrome",
    "flattens a nested list",
    "computes the average of a list of numbers",
]
LANGUAGES = ["Python", "JavaScript", "C", "Rust", "Go", "Java"]
SENTENCES = [
    "The weather is lovely today.",
    "Where is the nearest train station?",
    "I would like a cup of coffee, please.",
    "Our meeting has been moved to Friday.",
    "Reading books makes me happy.",
    "Please close the window before you leave.",
]
HUMAN_LANGUAGES = ["French", "Spanish", "German", "Italian", "Portuguese"]
ROLES = [
    "a pirate captain",
    "a friendly librarian",
    "a medieval knight",
    "a travel guide",
    "a detective",
    "a personal trainer",
    "a chef",
    "an astronaut",
]
QUESTIONS = [
    "What are three tips for staying productive?",
    "How do I start learning to draw?",
    "Why is the sky blue?",
    "What should I pack for a weekend hiking trip?",
    "How can I improve my sleep?",
    "What is the difference between a virus and a bacterium?",
    "How do airplanes stay in the air?",
    "What are the benefits of regular exercise?",
    "How do I make a simple budget?",
    "What makes a good presentation?",
]


def builtin_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` distinct prompts drawn (seeded) from the templates above."""
    pool = sorted(set(_template_prompts()) | set(_passage_prompts()))
    rng = random.Random(seed)
    rng.shuffle(pool)
    if count > len(pool):
        raise InvalidRequestError(f"at most {len(pool)} built-in prompts; pass --prompts FILE")
    return pool[:count]


def read_prompts(path: Path) -> list[str]:
    """One prompt per line, or JSON Lines with a 'prompt' field (blank lines skipped)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise InvalidRequestError(f"cannot read --prompts {path}: {error.strerror}") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                prompts.append(str(json.loads(line)["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InvalidRequestError(
                    f"{path}:{number}: expected a JSON object with a 'prompt' field"
                ) from None
        else:
            prompts.append(line)
    if len(prompts) < 2:
        raise InvalidRequestError(f"{path} holds {len(prompts)} prompts; need at least 2")
    return prompts


def _template_prompts() -> list[str]:
    out = [f"Write {form} about {topic}." for form, topic in itertools.product(FORMS, TOPICS)]
    out += [f"Explain {c} to {a}." for c, a in itertools.product(CONCEPTS, AUDIENCES)]
    out += [
        f"Write a {lang} function that {task}."
        for lang, task in itertools.product(LANGUAGES, CODE_TASKS)
    ]
    out += [
        f"Translate into {lang}: {s}" for lang, s in itertools.product(HUMAN_LANGUAGES, SENTENCES)
    ]
    out += [f"You are {role}. Introduce yourself and describe your day." for role in ROLES]
    out += [
        f"Pretend you are {role} and give me advice about {topic}."
        for role, topic in itertools.product(ROLES, TOPICS[:8])
    ]
    out += QUESTIONS
    out += [f"{q} Answer in one short paragraph." for q in QUESTIONS]
    rng = random.Random(1234)
    for _ in range(120):
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
        out.append(
            rng.choice(
                [
                    f"What is {a} + {b}? Show your steps.",
                    f"What is {a} times {c}? Explain how you got it.",
                    f"A shop sells pens for {c} dollars each. How much do {a} pens cost?",
                    f"Tom has {a} apples and gives away {min(a, b)}. How many are left?",
                    f"If a train travels {a} km per hour for {c} hours, how far does it go?",
                ]
            )
        )
    out += [f"List three facts about {c}." for c in CONCEPTS]
    out += [
        f"What are the pros and cons of {t}?"
        for t in (
            "electric cars",
            "remote work",
            "social media",
            "nuclear power",
            "online classes",
            "city life",
        )
    ]
    return out


def _passage_prompts() -> list[str]:
    """Summarise / explain standard-library docstrings (leading paragraphs, 200-900 chars)."""
    modules = [
        "json",
        "collections",
        "functools",
        "itertools",
        "pathlib",
        "random",
        "string",
        "textwrap",
        "datetime",
        "fractions",
        "statistics",
        "heapq",
        "bisect",
        "shutil",
        "logging",
        "argparse",
        "csv",
        "email",
        "zipfile",
        "decimal",
    ]
    passages = []
    for name in modules:
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj) if (inspect.isclass(obj) or inspect.isfunction(obj)) else None
            text = ""
            for paragraph in (doc or "").split("\n\n"):
                if len(text) >= 200 or len(text) + len(paragraph) > 900:
                    break
                text = f"{text} {' '.join(paragraph.split())}".strip()
            if len(text) >= 200:
                passages.append(text)
    passages = sorted(set(passages))[:120]
    asks = [
        "Summarize this text in two sentences:",
        "Explain this text in simple words:",
        "List the key points of this text:",
    ]
    return [f"{asks[i % len(asks)]}\n\n{p}" for i, p in enumerate(passages)]
