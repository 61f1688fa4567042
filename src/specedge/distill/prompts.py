"""Training prompts for distillation, written here rather than taken from any benchmark.

`builtin_prompts` composes instruction prompts from small templates (writing, role-play,
reasoning, arithmetic, coding, extraction, science, humanities, open questions) and from the
task formats common in speculative-decoding benchmarks, written here: German-to-English
translation of sentences composed below, short factual questions, multi-step arithmetic word
problems, and summaries of / questions on long passages. The passages are text that ships with
every Python install: standard-library docstrings and the language reference in
`pydoc_data.topics`. None of it comes from the SpecBench evaluation set in `shared/data/`; the
tests check there is no overlap (no shared prompt, no shared 8-word run).
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import random
from pathlib import Path

from specedge.errors import InvalidRequestError
from specedge.text import read_prompt_file

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


def builtin_prompts(count: int | None = None, seed: int = 0) -> list[str]:
    """`count` (default: all) distinct prompts drawn (seeded) from the families below."""
    families = (_template_prompts, _passage_prompts, _task_family_prompts, _reference_prompts)
    pool = sorted({prompt for family in families for prompt in family()})
    rng = random.Random(seed)
    rng.shuffle(pool)
    if count is None:
        return pool
    if count > len(pool):
        raise InvalidRequestError(f"at most {len(pool)} built-in prompts; pass --prompts FILE")
    return pool[:count]


def read_prompts(path: Path) -> list[str]:
    """One prompt per line, or JSON Lines with a 'prompt' field (blank lines skipped)."""
    prompts = read_prompt_file(path, "--prompts")
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


# ---- SpecBench-like task families (formats only; no text from the evaluation set) ------------

GERMAN_SUBJECTS = [
    ("Die Regierung", "hat"),
    ("Der Bürgermeister", "hat"),
    ("Die Polizei", "hat"),
    ("Das Unternehmen", "hat"),
    ("Die Zentralbank", "hat"),
    ("Der Verein", "hat"),
    ("Die Stadtverwaltung", "hat"),
    ("Der Minister", "hat"),
    ("Die Gewerkschaft", "hat"),
    ("Das Gericht", "hat"),
    ("Viele Bürger", "haben"),
    ("Die Forscher", "haben"),
    ("Die Abgeordneten", "haben"),
    ("Die Schüler", "haben"),
    ("Die Bauern", "haben"),
]
GERMAN_PAST = [
    "am Montag neue Pläne für den Nahverkehr vorgestellt",
    "eine Erklärung zu den steigenden Preisen veröffentlicht",
    "die Entscheidung auf das nächste Jahr verschoben",
    "gegen die geplante Reform protestiert",
    "mehr Geld für Schulen und Krankenhäuser gefordert",
    "den Vertrag nach langen Verhandlungen unterschrieben",
    "die Ergebnisse einer neuen Studie präsentiert",
    "vor den Folgen des Klimawandels gewarnt",
    "im vergangenen Jahr deutlich mehr verdient",
    "die Vorwürfe am Abend entschieden zurückgewiesen",
    "eine Untersuchung des Unfalls eingeleitet",
    "nach dem Sturm mit den Aufräumarbeiten begonnen",
]
GERMAN_OTHER = [
    "Die Zahl der Arbeitslosen ist im Herbst leicht gesunken .",
    "Nach Angaben der Feuerwehr wurde bei dem Brand niemand verletzt .",
    "Der Zug nach Berlin hatte wegen eines technischen Defekts zwei Stunden Verspätung .",
    "In vielen Städten sind die Mieten in den letzten zehn Jahren stark gestiegen .",
    "Die Mannschaft gewann das Spiel am Samstag mit drei zu eins .",
    "Experten erwarten, dass die Wirtschaft im nächsten Jahr wieder wächst .",
    "Das neue Museum soll im Frühjahr für Besucher öffnen .",
    "Wegen des starken Regens wurden mehrere Straßen gesperrt .",
    "Die Verhandlungen zwischen beiden Ländern gehen am Dienstag weiter .",
    "Immer mehr Menschen kaufen ihre Lebensmittel im Internet .",
    "Der Flughafen rechnet in diesem Sommer mit einem neuen Rekord an Passagieren .",
    "Die Ärzte raten dazu, sich im Herbst gegen Grippe impfen zu lassen .",
]
ENGLISH_TO = ["German", "French", "Spanish"]

QA_TEMPLATES = {
    "What is the capital of {}?": [
        "Australia",
        "Canada",
        "Brazil",
        "Kenya",
        "Norway",
        "Peru",
        "Vietnam",
        "Egypt",
        "Portugal",
        "Chile",
        "Thailand",
        "Poland",
        "Morocco",
        "New Zealand",
        "Argentina",
    ],
    "Who wrote {}?": [
        "Pride and Prejudice",
        "Moby-Dick",
        "The Odyssey",
        "War and Peace",
        "Hamlet",
        "The Great Gatsby",
        "Don Quixote",
        "Frankenstein",
        "Jane Eyre",
        "The Old Man and the Sea",
    ],
    "Who invented the {}?": [
        "telephone",
        "light bulb",
        "printing press",
        "steam engine",
        "World Wide Web",
        "airplane",
        "telescope",
        "radio",
        "dynamite",
        "typewriter",
    ],
    "When did {} happen?": [
        "the French Revolution",
        "the first moon landing",
        "the fall of the Berlin Wall",
        "the Great Fire of London",
        "the signing of the Magna Carta",
        "the Battle of Hastings",
        "the sinking of the Titanic",
        "the first Olympic Games of the modern era",
    ],
    "Where is {} located?": [
        "the Eiffel Tower",
        "Machu Picchu",
        "the Great Barrier Reef",
        "Mount Kilimanjaro",
        "the Taj Mahal",
        "Angkor Wat",
        "the Colosseum",
        "Niagara Falls",
        "Lake Baikal",
        "the Sahara Desert",
        "Stonehenge",
        "the Acropolis",
    ],
    "What is {} known for?": [
        "Marie Curie",
        "Isaac Newton",
        "Leonardo da Vinci",
        "Nelson Mandela",
        "Ada Lovelace",
        "Charles Darwin",
        "Frida Kahlo",
        "Mahatma Gandhi",
        "Wolfgang Amadeus Mozart",
        "Florence Nightingale",
        "Galileo Galilei",
        "Rosa Parks",
    ],
    "How many {}?": [
        "players are on a basketball team",
        "bones are in the human body",
        "planets are in the solar system",
        "strings does a violin have",
        "states are in the United States",
        "keys does a standard piano have",
        "hearts does an octopus have",
        "minutes are in a day",
    ],
    "Who was the first {}?": [
        "person to walk on the moon",
        "woman to win a Nobel Prize",
        "president of the United States",
        "person to reach the South Pole",
        "emperor of Rome",
        "person to swim across the English Channel",
    ],
}

MATH_STORIES = [
    "{name} buys {a} notebooks at ${b} each and a backpack that costs ${c}. "
    "How much does {name} spend in total?",
    "{name} reads {a} pages on Monday and twice as many on Tuesday. The book has {big} pages. "
    "How many pages are left?",
    "A farmer has {a} cows. Each cow gives {b} liters of milk a day. Milk sells for ${c} a "
    "liter. How much money does the farmer make in a week?",
    "{name} saves ${b} every week. After {a} weeks, {name} spends ${c} on a gift. "
    "How much money is left?",
    "A bakery makes {big} cookies. It sells {a} boxes with {b} cookies in each box. "
    "How many cookies are not sold?",
    "{name} runs {b} miles a day for {a} days, then rests for {c} days. How many miles does "
    "{name} run in total?",
    "A class has {a} students. {b} of them bring lunch from home and the rest buy lunch for "
    "${c} each. How much do the students spend on lunch?",
    "The price of a jacket is ${big}. It is on sale for {pct}% off. What is the sale price?",
    "{name} has {big} marbles and shares them equally among {c} friends, keeping {a} for "
    "{pronoun}self. How many marbles does each friend get?",
    "A car uses {c} liters of fuel for every 100 km. How much fuel does it need for a trip of "
    "{big} km and back?",
]
NAMES = ["Maria", "James", "Aisha", "Liam", "Sofia", "Noah", "Chen", "Emma", "Omar", "Lucas"]
PRONOUNS = {"Maria": "her", "Aisha": "her", "Sofia": "her", "Emma": "her"}


def _task_family_prompts() -> list[str]:
    rng = random.Random(4321)
    out = [
        f"Translate German to English: {subject} {aux} {rest} ."
        for (subject, aux), rest in itertools.product(GERMAN_SUBJECTS, GERMAN_PAST)
    ]
    out += [f"Translate German to English: {s}" for s in GERMAN_OTHER]
    out += [
        f"Translate English to {lang}: {s}" for lang, s in itertools.product(ENGLISH_TO, SENTENCES)
    ]
    out += [template.format(item) for template, items in QA_TEMPLATES.items() for item in items]
    out += [
        template.format(item).lower().rstrip("?")
        for template, items in QA_TEMPLATES.items()
        for item in items[:4]
    ]
    for index in range(240):
        name = NAMES[index % len(NAMES)]
        out.append(
            MATH_STORIES[index % len(MATH_STORIES)].format(
                name=name,
                pronoun=PRONOUNS.get(name, "him"),
                a=rng.randint(3, 12),
                b=rng.randint(2, 15),
                c=rng.randint(2, 9),
                big=rng.randrange(100, 600, 10),
                pct=rng.choice([10, 20, 25, 30, 40, 50]),
            )
        )
    return out


def _reference_prompts() -> list[str]:
    """Summaries of and questions on long passages (2-3.5k characters) of the Python language
    reference that ships with CPython (`pydoc_data.topics`), its prose paragraphs in order."""
    from pydoc_data.topics import topics

    asks = ["Summarize:", "Summarize the following text:", "Write a short summary of this text:"]
    out: list[str] = []
    passage, subject = "", ""
    for key in sorted(topics):
        title, _, body = topics[key].partition("\n")
        for paragraph in body.split("\n\n"):
            if not paragraph.strip() or paragraph.startswith(("   ", "*", "=", "-")):
                continue
            subject = subject or title.strip().strip("*").strip()
            passage = f"{passage}\n{' '.join(paragraph.split())}".strip()
            if len(passage) < 2000:
                continue
            passage = passage[:3500]
            out.append(f"{asks[len(out) % len(asks)]} {passage}")
            out.append(f"{passage}\nWhat is {subject[0].lower()}{subject[1:]}?")
            out.append(f"{passage}\nAccording to the text, what is this used for?")
            passage, subject = "", ""
    return out
