"""Generate `instructions.jsonl`, the small instruction-tuning set bundled with rf-callbacks.

Every row is `{"instruction": ..., "response": ...}`. The tasks are templated and their answers computed, so a tiny
randomly initialised model can visibly learn them in a few hundred steps: arithmetic word problems, unit conversions,
string edits, sorting, antonyms, plurals, past tense, calendar and color facts.

The output is a pure function of `random.Random(0)` and this file (stdlib only): running
`python make_instructions.py` rewrites the JSONL byte-identically.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

ROWS_PER_TASK = 20
OUTPUT = Path(__file__).with_name("instructions.jsonl")

NAMES = ["Tom", "Ana", "Raj", "Mia", "Leo", "Sara", "Ben", "Yuki", "Omar", "Lena", "Ivan", "Zoe"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "coins", "shells", "cards", "stamps"]
CONTAINERS = ["boxes", "bags", "baskets", "jars", "crates", "trays"]
WORDS = [
    "planet", "garden", "window", "rocket", "silver", "forest", "bridge", "candle", "yellow", "puzzle",
    "basket", "dragon", "summer", "island", "pepper", "mirror", "tunnel", "orange", "violin", "castle",
    "banana", "river", "cloud", "stone", "light", "music", "table", "horse", "paper", "ocean",
]  # fmt: skip
ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"), ("open", "closed"),
    ("early", "late"), ("full", "empty"), ("hard", "soft"), ("high", "low"), ("old", "new"), ("rich", "poor"),
    ("strong", "weak"), ("thick", "thin"), ("wet", "dry"), ("loud", "quiet"), ("first", "last"), ("up", "down"),
    ("win", "lose"), ("push", "pull"), ("near", "far"), ("clean", "dirty"), ("long", "short"), ("day", "night"),
]  # fmt: skip
PLURALS = [
    ("child", "children"), ("mouse", "mice"), ("tooth", "teeth"), ("foot", "feet"), ("man", "men"),
    ("woman", "women"), ("goose", "geese"), ("person", "people"), ("box", "boxes"), ("bus", "buses"),
    ("city", "cities"), ("baby", "babies"), ("leaf", "leaves"), ("knife", "knives"), ("wolf", "wolves"),
    ("cat", "cats"), ("dog", "dogs"), ("book", "books"), ("dish", "dishes"), ("church", "churches"),
    ("sheep", "sheep"), ("fish", "fish"), ("potato", "potatoes"), ("hero", "heroes"), ("story", "stories"),
    ("glass", "glasses"), ("house", "houses"), ("tree", "trees"),
]  # fmt: skip
# (present for "I/you/we/they", present for "he/she", past, complements that make sense with the verb)
VERBS = [
    ("walk", "walks", "walked", ["to school", "in the park", "the dog"]),
    ("play", "plays", "played", ["chess", "the piano", "football"]),
    ("watch", "watches", "watched", ["a movie", "the birds", "the news"]),
    ("cook", "cooks", "cooked", ["dinner", "the rice", "a big meal"]),
    ("clean", "cleans", "cleaned", ["the kitchen", "the windows", "the car"]),
    ("paint", "paints", "painted", ["the fence", "a picture", "the door"]),
    ("visit", "visits", "visited", ["the museum", "our aunt", "the zoo"]),
    ("open", "opens", "opened", ["the window", "the shop", "a letter"]),
    ("eat", "eats", "ate", ["an apple", "lunch", "some soup"]),
    ("see", "sees", "saw", ["the stars", "a rainbow", "the doctor"]),
    ("write", "writes", "wrote", ["a letter", "a poem", "the report"]),
    ("read", "reads", "read", ["a book", "the paper", "a story"]),
    ("buy", "buys", "bought", ["bread", "new shoes", "some milk"]),
    ("find", "finds", "found", ["the keys", "a coin", "the answer"]),
    ("make", "makes", "made", ["a cake", "tea", "a plan"]),
    ("take", "takes", "took", ["the bus", "a photo", "the train"]),
    ("bring", "brings", "brought", ["lunch", "the ball", "flowers"]),
    ("draw", "draws", "drew", ["a map", "a cat", "the house"]),
    ("sell", "sells", "sold", ["fruit", "old books", "lemonade"]),
    ("carry", "carries", "carried", ["the bags", "a box", "the baby"]),
]
SUBJECTS = ["I", "We", "They", "You", "He", "She", "My friend", "The teacher", "Our neighbor", "The boy"]
THIRD_PERSON = {"He", "She", "My friend", "The teacher", "Our neighbor", "The boy"}
TIMES = ["every morning", "on Sundays", "after school", "every day", "in the evening", ""]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    ("January", 31), ("February", 28), ("March", 31), ("April", 30), ("May", 31), ("June", 30), ("July", 31),
    ("August", 31), ("September", 30), ("October", 31), ("November", 30), ("December", 31),
]  # fmt: skip
SEASONS = {
    "December": "winter", "January": "winter", "February": "winter", "March": "spring", "April": "spring",
    "May": "spring", "June": "summer", "July": "summer", "August": "summer", "September": "autumn",
    "October": "autumn", "November": "autumn",
}  # fmt: skip
COLOR_MIXES = [
    ("blue", "yellow", "green"), ("red", "yellow", "orange"), ("red", "blue", "purple"), ("red", "white", "pink"),
    ("black", "white", "gray"), ("blue", "white", "light blue"),
]  # fmt: skip
COLOR_OF = [
    ("a ripe banana", "yellow"), ("the sky on a clear day", "blue"), ("fresh grass", "green"), ("snow", "white"),
    ("coal", "black"), ("a ripe tomato", "red"), ("a carrot", "orange"), ("a lemon", "yellow"),
    ("a fire truck", "red"), ("milk", "white"), ("a lime", "green"), ("a pumpkin", "orange"),
    ("an eggplant", "purple"), ("chocolate", "brown"), ("a crow", "black"), ("the sun in a drawing", "yellow"),
]  # fmt: skip
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
# (unit, plural, target unit, target plural, factor)
CONVERSIONS = [
    ("kilometer", "kilometers", "meter", "meters", 1000), ("meter", "meters", "centimeter", "centimeters", 100),
    ("hour", "hours", "minute", "minutes", 60), ("minute", "minutes", "second", "seconds", 60),
    ("kilogram", "kilograms", "gram", "grams", 1000), ("day", "days", "hour", "hours", 24),
    ("week", "weeks", "day", "days", 7), ("liter", "liters", "milliliter", "milliliters", 1000),
    ("dollar", "dollars", "cent", "cents", 100), ("year", "years", "month", "months", 12),
]  # fmt: skip


def plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def add_problem(rng: random.Random) -> tuple[str, str]:
    name, item, a, b = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(2, 30), rng.randint(2, 30)
    return (
        f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
        f"{name} has {a} + {b} = {a + b} {item} now.",
    )


def subtract_problem(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a = rng.randint(10, 50)
    b = rng.randint(1, a - 1)
    return (
        f"{name} had {a} {item} and gave away {b}. How many {item} are left?",
        f"{name} has {a} - {b} = {plural(a - b, item[:-1], item)} left.",
    )


def multiply_problem(rng: random.Random) -> tuple[str, str]:
    item, box, a, b = rng.choice(ITEMS), rng.choice(CONTAINERS), rng.randint(2, 9), rng.randint(2, 12)
    return (
        f"There are {a} {box} with {b} {item} in each. How many {item} are there in total?",
        f"There are {a} x {b} = {a * b} {item} in total.",
    )


def share_problem(rng: random.Random) -> tuple[str, str]:
    item, people, each = rng.choice(ITEMS), rng.randint(2, 8), rng.randint(2, 9)
    total = people * each
    return (
        f"{total} {item} are shared equally among {people} friends. How many does each friend get?",
        f"Each friend gets {total} / {people} = {each} {item}.",
    )


def price_problem(rng: random.Random) -> tuple[str, str]:
    item = rng.choice(["pen", "ticket", "notebook", "sandwich", "ball"])
    price, count = rng.randint(2, 15), rng.randint(2, 9)
    return (
        f"One {item} costs {price} dollars. How much do {count} {item}s cost?",
        f"{count} {item}s cost {count} x {price} = {count * price} dollars.",
    )


def bare_arithmetic(rng: random.Random) -> tuple[str, str]:
    op = rng.choice("+-x")
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    if op == "-" and b > a:
        a, b = b, a
    if op == "x":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return f"What is {a} {op} {b}?", f"{a} {op} {b} = {value}."


def convert_units(rng: random.Random) -> tuple[str, str]:
    one, many, t_one, t_many, factor = rng.choice(CONVERSIONS)
    n = rng.randint(1, 12)
    return (
        f"Convert {plural(n, one, many)} to {t_many}.",
        f"{plural(n, one, many)} is {plural(n * factor, t_one, t_many)}.",
    )


def reverse_word(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f'Reverse the letters of the word "{word}".', f'The word "{word}" reversed is "{word[::-1]}".'


def uppercase(rng: random.Random) -> tuple[str, str]:
    text = " ".join(rng.sample(WORDS, rng.randint(1, 3)))
    return f'Write "{text}" in uppercase letters.', f'In uppercase it is "{text.upper()}".'


def count_letters(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f'How many letters are in the word "{word}"?', f'The word "{word}" has {len(word)} letters.'


def count_one_letter(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    letter = rng.choice(sorted(set(word)))
    n = word.count(letter)
    times = "once" if n == 1 else "twice" if n == 2 else f"{n} times"
    return (
        f'How many times does the letter "{letter}" appear in "{word}"?',
        f'The letter "{letter}" appears {times} in "{word}".',
    )


def sort_numbers(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(1, 100), rng.randint(3, 6))
    descending = rng.random() < 0.3
    order = "largest to smallest" if descending else "smallest to largest"
    result = sorted(numbers, reverse=descending)
    return (
        f"Sort these numbers from {order}: {', '.join(map(str, numbers))}.",
        f"From {order}: {', '.join(map(str, result))}.",
    )


def sort_words(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return (
        f"Put these words in alphabetical order: {', '.join(words)}.",
        f"In alphabetical order: {', '.join(sorted(words))}.",
    )


def extreme_number(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(1, 100), rng.randint(3, 6))
    if rng.random() < 0.5:
        return (
            f"What is the largest number in this list: {', '.join(map(str, numbers))}?",
            f"The largest number is {max(numbers)}.",
        )
    return (
        f"What is the smallest number in this list: {', '.join(map(str, numbers))}?",
        f"The smallest number is {min(numbers)}.",
    )


def compare_numbers(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(1, 1000), 2)
    return f"Which is larger, {a} or {b}?", f"{max(a, b)} is larger than {min(a, b)}."


def even_odd(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(1, 999)
    kind = "even" if n % 2 == 0 else "odd"
    reason = "it divides evenly by 2" if kind == "even" else "it leaves a remainder of 1 when divided by 2"
    return f"Is {n} even or odd?", f"{n} is {kind}, because {reason}."


def antonym(rng: random.Random) -> tuple[str, str]:
    a, b = rng.choice(ANTONYMS)
    if rng.random() < 0.5:
        a, b = b, a
    return f'What is the opposite of "{a}"?', f'The opposite of "{a}" is "{b}".'


def plural_form(rng: random.Random) -> tuple[str, str]:
    one, many = rng.choice(PLURALS)
    return f'What is the plural of "{one}"?', f'The plural of "{one}" is "{many}".'


def past_tense(rng: random.Random) -> tuple[str, str]:
    subject, (base, third, past, objects) = rng.choice(SUBJECTS), rng.choice(VERBS)
    obj, when = rng.choice(objects), rng.choice(TIMES)
    tail = f" {obj} {when}".rstrip()
    present = third if subject in THIRD_PERSON else base
    return f"Rewrite this sentence in the past tense: {subject} {present}{tail}.", f"{subject} {past}{tail}."


def day_arithmetic(rng: random.Random) -> tuple[str, str]:
    i, k = rng.randrange(7), rng.randint(1, 10)
    if rng.random() < 0.5:
        when, j = "after", (i + k) % 7
    else:
        when, j = "before", (i - k) % 7
    if k == 1:
        return f"What day comes {when} {DAYS[i]}?", f"The day {when} {DAYS[i]} is {DAYS[j]}."
    return f"What day is it {k} days {when} {DAYS[i]}?", f"{k} days {when} {DAYS[i]} it is {DAYS[j]}."


def month_fact(rng: random.Random) -> tuple[str, str]:
    i = rng.randrange(12)
    name, days = MONTHS[i]
    kind = rng.randrange(4)
    if kind == 0:
        return f"Which month comes after {name}?", f"The month after {name} is {MONTHS[(i + 1) % 12][0]}."
    if kind == 1:
        note = " in a common year, and 29 in a leap year" if name == "February" else ""
        return f"How many days are in {name}?", f"{name} has {days} days{note}."
    if kind == 2:
        return f"Which number month of the year is {name}?", f"{name} is month number {i + 1} of the year."
    return (
        f"In which season is {name} in the northern hemisphere?",
        f"{name} is in {SEASONS[name]} in the northern hemisphere.",
    )


def color_fact(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.4:
        a, b, mix = rng.choice(COLOR_MIXES)
        if rng.random() < 0.5:
            a, b = b, a
        return f"What color do you get by mixing {a} and {b}?", f"Mixing {a} and {b} gives {mix}."
    thing, color = rng.choice(COLOR_OF)
    return f"What color is {thing}?", f"{thing[0].upper()}{thing[1:]} is usually {color}."


def letter_neighbors(rng: random.Random) -> tuple[str, str]:
    i = rng.randrange(1, 25)
    letter = chr(ord("A") + i)
    if rng.random() < 0.5:
        return (
            f"Which letter comes after {letter} in the alphabet?",
            f"The letter after {letter} is {chr(ord(letter) + 1)}.",
        )
    return (
        f"Which letter comes before {letter} in the alphabet?",
        f"The letter before {letter} is {chr(ord(letter) - 1)}.",
    )


def clock_time(rng: random.Random) -> tuple[str, str]:
    hour, minute, later = rng.randrange(24), rng.choice([0, 15, 30, 45]), rng.randint(1, 9)
    start, end = f"{hour:02d}:{minute:02d}", f"{(hour + later) % 24:02d}:{minute:02d}"
    return (
        f"It is {start} now. What time will it be in {plural(later, 'hour', 'hours')}?",
        f"In {plural(later, 'hour', 'hours')} it will be {end}.",
    )


def word_count(rng: random.Random) -> tuple[str, str]:
    subject, (base, third, _, objects) = rng.choice(SUBJECTS), rng.choice(VERBS)
    present = third if subject in THIRD_PERSON else base
    sentence = f"{subject} {present} {rng.choice(objects)} {rng.choice(TIMES)}".rstrip()
    return f'How many words are in the sentence "{sentence}"?', f"The sentence has {len(sentence.split())} words."


def number_word(rng: random.Random) -> tuple[str, str]:
    n = rng.randrange(len(NUMBER_WORDS))
    if rng.random() < 0.5:
        return f"Write the number {n} as a word.", f'The number {n} is written "{NUMBER_WORDS[n]}".'
    return f'Write "{NUMBER_WORDS[n]}" as a number.', f'"{NUMBER_WORDS[n].capitalize()}" is the number {n}.'


TASKS: list[Callable[[random.Random], tuple[str, str]]] = [
    add_problem, subtract_problem, multiply_problem, share_problem, price_problem, bare_arithmetic, convert_units,
    reverse_word, uppercase, count_letters, count_one_letter, sort_numbers, sort_words, extreme_number,
    compare_numbers, even_odd, antonym, plural_form, past_tense, day_arithmetic, month_fact, color_fact,
    letter_neighbors, clock_time, word_count, number_word,
]  # fmt: skip


def generate(rows_per_task: int = ROWS_PER_TASK, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for task in TASKS:
        # Small tasks (antonyms, plurals, letters) run out of distinct prompts: give up after a bounded number of draws
        # instead of repeating rows, which would leak between the train and eval splits.
        made = 0
        for _ in range(rows_per_task * 20):
            if made == rows_per_task:
                break
            instruction, response = task(rng)
            if instruction not in seen:
                seen.add(instruction)
                rows.append({"instruction": instruction, "response": response})
                made += 1
    # Interleave the tasks so any contiguous slice (a chunk, a sequential batch) holds a mix of them.
    rng.shuffle(rows)
    return rows


def write_jsonl(rows: list[dict[str, str]], output: Path) -> None:
    """Write `rows` as JSON lines, byte-identically on every platform (UTF-8, `\\n` line ends)."""
    with open(output, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    print(f"wrote {len(rows)} rows ({output.stat().st_size} bytes) to {output}")


def main(argv: list[str]) -> None:
    write_jsonl(generate(), Path(argv[1]) if len(argv) > 1 else OUTPUT)


if __name__ == "__main__":
    main(sys.argv)
