"""The bundled SFT task suite: instructions with worked reference answers that can be checked.

Six families (arithmetic word problems, unit conversion, string manipulation, sorting, calendar
arithmetic, comparisons), each with several wordings, names and units, so that no single
sentence can be memorised. Every reference is a short worked answer ending in `Answer: X`;
`check()` extracts the final answer from any response, tolerant of format.

Three splits never share a prompt: a prompt's split (train, validation, test) is decided by a
hash of its text, and each split is drawn from its own seeded stream, so no split depends on
another's size. Validation is for choosing recipes; test is reported once. Every split is drawn
by the same generators, so held-out prompts are never easier or different in kind from train.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Callable

from selfplay.data.shards import prompt_hash
from selfplay.errors import SelfplayError

FAMILIES = ("arithmetic", "units", "strings", "sorting", "calendar", "comparison")
SPLITS = ("train", "validation", "test")
TEST_SHARE = 0.2        # the share of the prompt space that belongs to the test split
VALIDATION_SHARE = 0.1  # and to the validation split (carved out of what was train)
DEFAULT_SIZES = {"train": 2000, "validation": 300, "test": 500}

NAMES = ("Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jack",
         "Kira", "Liam", "Maya", "Noah", "Olga", "Pablo", "Rosa", "Sam", "Tara", "Yuki")
ITEMS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells",
         "cards", "coins", "balloons", "eggs")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
WORDS = ("cat", "dog", "sun", "tree", "book", "lamp", "fish", "bird", "milk", "rain", "star",
         "door", "ship", "frog", "cake", "moon", "road", "wind", "leaf", "king", "apple",
         "house", "river", "plant", "stone", "cloud", "bread", "chair", "table", "light",
         "water", "green", "happy", "music", "paper", "banana", "garden", "letter", "pepper",
         "summer", "yellow", "rabbit", "mirror", "little", "coffee")


@dataclass(frozen=True)
class Task:
    family: str
    prompt: str
    reference: str
    answer: str


# ---------------------------------------------------------------------------------------
# Generators: one per family, each (rng) -> Task
# ---------------------------------------------------------------------------------------

def _arithmetic(rng: random.Random) -> Task:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.choice(("add", "sub", "mul", "add_sub", "mul_add"))
    if kind == "add":
        a, b = rng.randint(12, 99), rng.randint(12, 99)
        q = rng.choice((f"{name} has {a} {item} and gets {b} more. How many {item} does {name} "
                        "have now?",
                        f"There are {a} {item} in a box. {name} puts in {b} more. How many {item}"
                        " are in the box?",
                        f"{name} collected {a} {item} on Monday and {b} {item} on Tuesday. How "
                        f"many {item} did {name} collect in total?"))
        ans = a + b
        ref = f"We add the two amounts: {a} + {b} = {ans}.\nAnswer: {ans}"
    elif kind == "sub":
        a = rng.randint(30, 99)
        b = rng.randint(3, a - 1)
        q = rng.choice((f"{name} has {a} {item} and gives away {b}. How many {item} are left?",
                        f"A jar holds {a} {item}. {name} takes out {b}. How many {item} remain "
                        "in the jar?",
                        f"{name} had {a} {item} but lost {b} of them. How many {item} does "
                        f"{name} have now?"))
        ans = a - b
        ref = f"We subtract what is gone: {a} - {b} = {ans}.\nAnswer: {ans}"
    elif kind == "mul":
        a, b = rng.randint(3, 12), rng.randint(3, 12)
        q = rng.choice((f"{name} has {a} bags with {b} {item} in each bag. How many {item} is "
                        "that in total?",
                        f"There are {a} rows of {item} with {b} {item} in each row. How many "
                        f"{item} are there?",
                        f"{name} buys {a} packs of {item}. Each pack has {b} {item}. How many "
                        f"{item} does {name} buy?"))
        ans = a * b
        ref = f"There are {a} groups of {b}, so we multiply: {a} x {b} = {ans}.\nAnswer: {ans}"
    elif kind == "add_sub":
        a, b = rng.randint(10, 60), rng.randint(5, 40)
        c = rng.randint(2, a + b - 1)
        q = rng.choice((f"{name} has {a} {item}, finds {b} more, then gives {c} to a friend. "
                        f"How many {item} does {name} have now?",
                        f"A basket has {a} {item}. {name} adds {b} and later removes {c}. How "
                        f"many {item} are in the basket?"))
        ans = a + b - c
        ref = (f"First add: {a} + {b} = {a + b}. Then subtract: {a + b} - {c} = {ans}.\n"
               f"Answer: {ans}")
    else:
        a, b, c = rng.randint(2, 9), rng.randint(3, 12), rng.randint(2, 30)
        q = rng.choice((f"{name} has {c} {item} and buys {a} packs with {b} {item} in each "
                        f"pack. How many {item} does {name} have now?",
                        f"A shelf holds {c} {item}. {name} adds {a} boxes of {b} {item}. How "
                        f"many {item} are on the shelf?"))
        ans = a * b + c
        ref = (f"First multiply: {a} x {b} = {a * b}. Then add: {a * b} + {c} = {ans}.\n"
               f"Answer: {ans}")
    return Task("arithmetic", q, ref, str(ans))


UNITS = (  # (big unit, small unit, factor)
    ("meters", "centimeters", 100), ("kilometers", "meters", 1000), ("kilograms", "grams", 1000),
    ("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24),
    ("weeks", "days", 7), ("liters", "milliliters", 1000), ("dozens", "items", 12),
    ("years", "months", 12), ("feet", "inches", 12), ("gallons", "quarts", 4),
    ("pounds", "ounces", 16), ("decades", "years", 10), ("centuries", "years", 100),
    ("meters", "millimeters", 1000))


def _units(rng: random.Random) -> Task:
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(2, 12) if rng.random() < 0.4 else rng.randint(13, 60)
    one = {"dozens": "dozen", "feet": "foot", "centuries": "century"}.get(big, big[:-1])
    q = rng.choice((f"How many {small} are in {n} {big}?",
                    f"Convert {n} {big} to {small}.",
                    f"What is {n} {big} in {small}?",
                    f"Express {n} {big} in {small}.",
                    f"{n} {big} is how many {small}?"))
    ans = n * factor
    ref = (f"One {one} is {factor} {small}, so {n} {big} is {n} x {factor} = {ans} {small}.\n"
           f"Answer: {ans}")
    return Task("units", q, ref, str(ans))


def _strings(rng: random.Random) -> Task:
    word = rng.choice(WORDS)
    kind = rng.choice(("reverse", "count", "upper", "first", "last", "length"))
    if kind == "reverse":
        q = rng.choice((f"Reverse the word \"{word}\".", f"Write \"{word}\" backwards.",
                        f"What is the word \"{word}\" spelled in reverse order?"))
        ans = word[::-1]
        ref = (f"The letters of \"{word}\" are {', '.join(word)}. Read from the end they give "
               f"\"{ans}\".\nAnswer: {ans}")
    elif kind == "count":
        letter = rng.choice(sorted(set(word)))
        q = rng.choice((f"How many times does the letter \"{letter}\" appear in \"{word}\"?",
                        f"Count the letter \"{letter}\" in the word \"{word}\"."))
        ans = str(word.count(letter))
        ref = (f"The letters of \"{word}\" are {', '.join(word)}. The letter \"{letter}\" "
               f"appears {ans} time{'s' if ans != '1' else ''}.\nAnswer: {ans}")
    elif kind == "upper":
        q = rng.choice((f"Write the word \"{word}\" in capital letters.",
                        f"Convert \"{word}\" to uppercase."))
        ans = word.upper()
        ref = f"Each letter of \"{word}\" becomes a capital letter: \"{ans}\".\nAnswer: {ans}"
    elif kind == "first":
        q = rng.choice((f"What is the first letter of the word \"{word}\"?",
                        f"Which letter does \"{word}\" start with?"))
        ans = word[0]
        ref = f"The word \"{word}\" starts with the letter \"{ans}\".\nAnswer: {ans}"
    elif kind == "last":
        q = rng.choice((f"What is the last letter of the word \"{word}\"?",
                        f"Which letter does \"{word}\" end with?"))
        ans = word[-1]
        ref = f"The word \"{word}\" ends with the letter \"{ans}\".\nAnswer: {ans}"
    else:
        q = rng.choice((f"How many letters are in the word \"{word}\"?",
                        f"Count the letters in \"{word}\"."))
        ans = str(len(word))
        ref = (f"The letters of \"{word}\" are {', '.join(word)}, which is {ans} letters.\n"
               f"Answer: {ans}")
    return Task("strings", q, ref, ans)


def _sorting(rng: random.Random) -> Task:
    k = rng.choice((3, 3, 4, 5))
    nums = rng.sample(range(1, 60), k)
    desc = rng.random() < 0.3
    order = "from largest to smallest" if desc else "from smallest to largest"
    listed = ", ".join(map(str, nums))
    kind = rng.choice(("sort", "sort", "max", "min"))
    if kind == "sort":
        q = rng.choice((f"Sort these numbers {order}: {listed}.",
                        f"Put the numbers {listed} in order {order}.",
                        f"Arrange {listed} {order}."))
        ans = ", ".join(map(str, sorted(nums, reverse=desc)))
        ref = f"Ordering {listed} {order} gives {ans}.\nAnswer: {ans}"
    elif kind == "max":
        q = rng.choice((f"Which is the largest of these numbers: {listed}?",
                        f"Find the biggest number in this list: {listed}."))
        ans = str(max(nums))
        ref = f"Comparing {listed}, the largest is {ans}.\nAnswer: {ans}"
    else:
        q = rng.choice((f"Which is the smallest of these numbers: {listed}?",
                        f"Find the smallest number in this list: {listed}."))
        ans = str(min(nums))
        ref = f"Comparing {listed}, the smallest is {ans}.\nAnswer: {ans}"
    return Task("sorting", q, ref, ans)


def _calendar(rng: random.Random) -> Task:
    kind = rng.choice(("day_after", "day_after", "day_before", "month_after", "month_after",
                       "hours", "age"))
    if kind in ("day_after", "day_before"):
        d, n = rng.randrange(7), rng.randint(1, 9)
        sign = 1 if kind == "day_after" else -1
        ans = DAYS[(d + sign * n) % 7]
        word = "after" if sign == 1 else "before"
        days = f"{n} day{'s' if n > 1 else ''}"
        q = rng.choice((f"What day of the week is {days} {word} {DAYS[d]}?",
                        f"Today is {DAYS[d]}. What day {'will it be' if sign == 1 else 'was it'}"
                        f" {days} {'from now' if sign == 1 else 'ago'}?",
                        f"Which weekday comes {days} {word} {DAYS[d]}?",
                        f"If it is {DAYS[d]}, what day is it {days} "
                        f"{'later' if sign == 1 else 'earlier'}?"))
        steps = ", ".join(DAYS[(d + sign * i) % 7] for i in range(1, n + 1))
        ref = f"Counting {n} day{'s' if n > 1 else ''} {word} {DAYS[d]}: {steps}.\nAnswer: {ans}"
    elif kind == "month_after":
        m, n = rng.randrange(12), rng.randint(1, 7)
        ans = MONTHS[(m + n) % 12]
        months = f"{n} month{'s' if n > 1 else ''}"
        q = rng.choice((f"Which month comes {months} after {MONTHS[m]}?",
                        f"It is {MONTHS[m]}. What month will it be in {months}?",
                        f"What month is {months} after {MONTHS[m]}?"))
        steps = ", ".join(MONTHS[(m + i) % 12] for i in range(1, n + 1))
        ref = f"Counting {n} month{'s' if n > 1 else ''} after {MONTHS[m]}: {steps}.\nAnswer: {ans}"
    elif kind == "age":
        name, born, age = rng.choice(NAMES), rng.randint(1960, 2015), rng.randint(2, 40)
        ans = str(born + age)
        q = rng.choice((f"{name} was born in {born}. In which year does {name} turn {age}?",
                        f"A school opened in {born}. In what year is its {age}th anniversary?"))
        ref = f"We add the years: {born} + {age} = {ans}.\nAnswer: {ans}"
    else:
        h, n = rng.randint(1, 12), rng.randint(1, 11)
        ans = str((h + n - 1) % 12 + 1)
        q = rng.choice((f"It is {h} o'clock. What time will it be in {n} hour"
                        f"{'s' if n > 1 else ''}? Give the hour.",
                        f"A train leaves at {h} o'clock and the trip takes {n} hour"
                        f"{'s' if n > 1 else ''}. At what hour does it arrive?"))
        wrap = f", and {h + n} - 12 = {ans}" if h + n > 12 else ""
        ref = f"{h} + {n} = {h + n}{wrap}, so it will be {ans} o'clock.\nAnswer: {ans}"
    return Task("calendar", q, ref, ans)


def _comparison(rng: random.Random) -> Task:
    kind = rng.choice(("larger", "larger", "smaller", "smaller", "parity", "older"))
    if kind in ("larger", "smaller"):
        a = rng.randint(100, 999)
        b = a + rng.choice((-1, 1)) * rng.randint(1, 40 if rng.random() < 0.5 else 400)
        if not 10 <= b <= 999 or b == a:
            b = rng.choice([x for x in range(100, 1000) if x != a])
        ans = str(max(a, b) if kind == "larger" else min(a, b))
        q = rng.choice((f"Which number is {kind}, {a} or {b}?",
                        f"Of {a} and {b}, which is {kind}?"))
        ref = f"Comparing {a} and {b}, the {kind} number is {ans}.\nAnswer: {ans}"
    elif kind == "parity":
        n = rng.randint(2, 9999)
        ans = "even" if n % 2 == 0 else "odd"
        q = rng.choice((f"Is {n} an even or an odd number?", f"Is the number {n} even or odd?"))
        ref = (f"{n} ends in {n % 10}, which is {ans}, so {n} is {ans}.\n"
               f"Answer: {ans}")
    else:
        x, y = rng.sample(NAMES, 2)
        ax, ay = rng.sample(range(5, 60), 2)
        ans = x if ax > ay else y
        q = rng.choice((f"{x} is {ax} years old and {y} is {ay} years old. Who is older?",
                        f"{x} is {ax} and {y} is {ay}. Which of them is older?"))
        ref = f"{max(ax, ay)} is more than {min(ax, ay)}, so {ans} is older.\nAnswer: {ans}"
    return Task("comparison", q, ref, ans)


GENERATORS: dict[str, Callable[[random.Random], Task]] = {
    "arithmetic": _arithmetic, "units": _units, "strings": _strings, "sorting": _sorting,
    "calendar": _calendar, "comparison": _comparison}


# ---------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------

def split_of(prompt: str) -> str:
    h = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if h < TEST_SHARE:
        return "test"
    return "validation" if h < TEST_SHARE + VALIDATION_SHARE else "train"


def generate(split: str, n: int, seed: int = 0) -> list[Task]:
    """n distinct tasks of one split, families in turn; the same (split, n, seed) gives the same."""
    if split not in SPLITS:
        raise ValueError(f"the task suite has splits {', '.join(SPLITS)}, not {split!r}")
    rng = random.Random(f"selfplay-tasks/{seed}/{split}")
    seen: set[str] = set()
    out: list[Task] = []
    tries = 0
    while len(out) < n:
        fam = FAMILIES[len(out) % len(FAMILIES)]
        task = GENERATORS[fam](rng)
        tries += 1
        if tries > 200 * n + 10_000:
            raise RuntimeError(f"could not draw {n} distinct {split} tasks; ask for fewer")
        if task.prompt in seen or split_of(task.prompt) != split:
            continue
        seen.add(task.prompt)
        out.append(task)
    return out


def to_row(task: Task) -> dict:
    """The chat `messages` layout (UltraChat-style), with the checkable answer alongside; the
    prompt_id is the one every reader gives this prompt, in any layout."""
    user = {"role": "user", "content": task.prompt}
    return {"prompt_id": prompt_hash([user]), "prompt": task.prompt,
            "messages": [user, {"role": "assistant", "content": task.reference}],
            "family": task.family, "answer": task.answer}


def split_rows(split: str, seed: int = 0, sizes: dict[str, int] | None = None) -> list[dict]:
    """The rows of one split; `sizes` maps split names to sizes (DEFAULT_SIZES otherwise)."""
    if split not in SPLITS:
        raise SelfplayError(f"the bundled task suite has splits {', '.join(SPLITS)}, not "
                            f"{split!r}.")
    n = {**DEFAULT_SIZES, **(sizes or {})}[split]
    return [to_row(t) for t in generate(split, n, seed)]


# ---------------------------------------------------------------------------------------
# Checkers
# ---------------------------------------------------------------------------------------

_MARKER = re.compile(r"answer\s*(?:is|:|=)\s*", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_WORD = re.compile(r"[A-Za-z]+")


def _final_segment(response: str) -> tuple[str, bool]:
    """The text after the last 'Answer:' marker (and whether there was one)."""
    marks = list(_MARKER.finditer(response))
    if not marks:
        return response, False
    return response[marks[-1].end():].split("\n")[0], True


def _numbers(text: str) -> list[str]:
    out = []
    for s in _NUMBER.findall(text.replace(",", " , ")):
        v = float(s)
        out.append(str(int(v)) if v.is_integer() else s)
    return out


def extract(family: str, answer: str, response: str) -> str | None:
    """The final answer a response gives, in the shape of `answer`; None if there is none."""
    seg, marked = _final_segment(response)
    if "," in answer:                       # a sorted list: the numbers of the final segment
        nums = _numbers(seg if marked else response.strip().split("\n")[-1])
        return ", ".join(nums) if nums else None
    if _NUMBER.fullmatch(answer):
        nums = _numbers(re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", seg))   # 1,200 is one number
        if not nums:
            return None
        return nums[0] if marked else nums[-1]
    quoted = re.findall(r"[\"'“‘]([^\"'”’]+)[\"'”’]", seg)
    if marked:
        words = _WORD.findall(seg)
        return (quoted[0] if quoted else words[0] if words else None)
    if quoted:
        return quoted[-1]
    words = _WORD.findall(seg)
    return words[-1] if words else None


def check(family: str, answer: str, response: str) -> bool:
    got = extract(family, answer, response)
    if got is None:
        return False
    if family == "strings" and answer.isupper() and len(answer) > 1:
        return got.strip() == answer          # capitalisation is the point of the task
    return got.strip().lower() == answer.lower()
