"""Procedurally generated, learnable VQA/ChartQA-style tasks (deterministic for a given seed).

* ``shapes-vqa`` (VQAv2 layout): 1-3 coloured shapes; colour, shape, count and yes/no presence questions,
  each with 10 "human" answers that vary the way people do ("2"/"two", "Red.", an occasional dissenter).
* ``bar-chartqa`` (HuggingFaceM4/ChartQA layout): 3-5 coloured bars; bar value (numeric, relaxed accuracy),
  highest/lowest colour, and bar count questions.
* ``sign-textvqa`` (lmms-lab/textvqa layout): one of 6 words on a sign, in big glyphs, beside distractor shapes
  ("what word is written on the sign?"), with 10 "human" answers as in TextVQA.
* ``form-docvqa`` (lmms-lab/DocVQA layout): a small rendered document, either a form (sender, recipient) or a
  receipt (two items and a total) ("who is the sender?", "what is the total?").
* ``diagram-scienceqa`` (lmms-lab/ScienceQA layout): a diagram of an arrow and 2-3 shapes of different
  sizes; multiple choice (2-5 options in a fixed order per question) on the arrow's side, direction or
  colour or the largest shape, the answer's letter uniformly distributed.
"""
from __future__ import annotations

import functools
import io
import random

from PIL import Image, ImageDraw, ImageFont

SHAPE_COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230), "yellow": (235, 215, 40),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (245, 245, 245),
}
BAR_COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 90, 230), "orange": (245, 140, 30),
    "purple": (150, 60, 200), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


def _png(img: Image.Image) -> dict:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], rgb) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=rgb)
    elif kind == "square":
        draw.rectangle(box, fill=rgb)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=rgb)


def _human_answers(rng: random.Random, answer: str, variants: list[str], distractors: list[str]) -> list[dict]:
    """Ten annotator answers: mostly the answer in its surface variants, now and then a dissenter."""
    out = []
    for i in range(10):
        r = rng.random()
        if r < 0.06 and distractors:
            text = rng.choice(distractors)
        else:
            text = rng.choice(variants) if r < 0.45 else answer
        out.append({"answer": text, "answer_confidence": rng.choice(["yes", "yes", "maybe"]), "answer_id": i + 1})
    return out


def _variants(answer: str) -> list[str]:
    if answer.isdigit() and int(answer) in NUMBER_WORDS:
        return [answer, NUMBER_WORDS[int(answer)], NUMBER_WORDS[int(answer)].capitalize()]
    return [answer, answer.capitalize(), answer + "."]


def shapes_item(rng: random.Random, index: int, image_size: int) -> dict:
    """One shapes-vqa row in the VQAv2 column layout."""
    n = rng.randint(1, 3)
    kinds = rng.sample(SHAPES, n)
    colors = rng.sample(list(SHAPE_COLORS), n)
    shade = rng.randint(40, 90)
    img = Image.new("RGB", (image_size, image_size), (shade, shade, shade))
    draw = ImageDraw.Draw(img)
    cell = image_size // 2
    cells = rng.sample([(0, 0), (1, 0), (0, 1), (1, 1)], n)
    for kind, color, (cx, cy) in zip(kinds, colors, cells, strict=False):
        size = rng.randint(int(cell * 0.7), cell - 3)
        x0 = cx * cell + rng.randint(1, cell - size - 1)
        y0 = cy * cell + rng.randint(1, cell - size - 1)
        _draw_shape(draw, kind, (x0, y0, x0 + size, y0 + size), SHAPE_COLORS[color])

    qtype = rng.choice(["color", "shape", "count", "presence"])
    if qtype == "color":
        i = rng.randrange(n)
        question, answer = f"What color is the {kinds[i]}?", colors[i]
        distractors, answer_type = [c for c in SHAPE_COLORS if c != answer], "other"
    elif qtype == "shape":
        i = rng.randrange(n)
        question, answer = f"What shape is the {colors[i]} object?", kinds[i]
        distractors, answer_type = [s for s in SHAPES if s != answer], "other"
    elif qtype == "count":
        question, answer = "How many shapes are there?", str(n)
        distractors, answer_type = [str(k) for k in (1, 2, 3) if k != n], "number"
    else:
        if rng.random() < 0.5:
            i = rng.randrange(n)
            color, kind, answer = colors[i], kinds[i], "yes"
        else:
            color, kind = rng.choice(list(SHAPE_COLORS)), rng.choice(SHAPES)
            present = any(c == color and k == kind for c, k in zip(colors, kinds, strict=False))
            answer = "yes" if present else "no"
        question = f"Is there a {color} {kind}?"
        distractors, answer_type = ["no" if answer == "yes" else "yes"], "yes/no"
    answers = _human_answers(rng, answer, _variants(answer), distractors)
    return {
        "image": _png(img), "image_id": index, "question_id": index * 10, "question": question,
        "question_type": qtype, "answer_type": answer_type, "multiple_choice_answer": answer, "answers": answers,
    }


def chart_item(rng: random.Random, index: int, image_size: int) -> dict:
    """One bar-chartqa row in the HuggingFaceM4/ChartQA column layout (+ question_type)."""
    n = rng.randint(3, 5)
    colors = rng.sample(list(BAR_COLORS), n)
    while True:
        values = [rng.randint(1, 9) for _ in range(n)]
        if values.count(max(values)) == 1 and values.count(min(values)) == 1:
            break
    img = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    base, top = image_size - 4, 6
    unit = (base - top) / 9
    draw.line([(2, base), (image_size - 2, base)], fill=(120, 120, 120))
    slot = (image_size - 4) / n
    width = max(3, int(slot * 0.7))
    for i, (color, value) in enumerate(zip(colors, values, strict=False)):
        x0 = int(2 + i * slot + (slot - width) / 2)
        draw.rectangle([x0, int(base - value * unit), x0 + width, base - 1], fill=BAR_COLORS[color])

    qtype = rng.choice(["value", "highest", "lowest", "count"])
    if qtype == "value":
        i = rng.randrange(n)
        query, label = f"What is the value of the {colors[i]} bar?", str(values[i])
    elif qtype == "highest":
        query, label = "Which color is the highest bar?", colors[values.index(max(values))]
    elif qtype == "lowest":
        query, label = "Which color is the lowest bar?", colors[values.index(min(values))]
    else:
        query, label = "How many bars are there?", str(n)
    return {"image": _png(img), "query": query, "label": [label], "human_or_machine": 1, "question_type": qtype}


SIGN_WORDS = ("STOP", "OPEN", "EXIT", "TAXI", "CAFE", "BANK")
SIGN_COLORS = {"white": (240, 240, 240), "yellow": (240, 210, 40)}  # dark ink on either
DOC_NAMES = ("ANN", "BOB", "EVE", "MAX", "SUE", "JIM", "KAY", "LOU")  # pairwise >= 2 letters apart (ANLS 0)
DOC_ITEMS = ("TEA", "PIE", "JAM", "EGG")


@functools.lru_cache(maxsize=16)
def _font(px: int):
    """Pillow's embedded FreeType font (Aileron) at ``px``: the same glyphs on every machine, no system fonts."""
    return ImageFont.load_default(size=max(6, px))


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0


def sign_item(rng: random.Random, index: int, image_size: int) -> dict:
    """One sign-textvqa row in the lmms-lab/textvqa column layout (+ question_type): a word on a sign, in glyphs a
    quarter of the image high, 1-2 distractor shapes in the other half of the image. The sign sits on an eighth-of-
    the-image grid (the tiny model's patch grid at its default sizes), so a glyph looks the same wherever it is."""
    word = rng.choice(SIGN_WORDS)
    paper, ink = SIGN_COLORS[rng.choice(list(SIGN_COLORS))], (rng.randint(0, 40),) * 3
    shade = rng.randint(40, 100)
    img = Image.new("RGB", (image_size, image_size), (shade, shade + rng.randint(0, 30), shade))
    draw = ImageDraw.Draw(img)
    font = _font(image_size // 4)
    width, height = _text_size(draw, word, font)
    pad = max(2, image_size // 20)
    box_w, box_h = width + 2 * pad, height + 2 * pad
    top = rng.random() < 0.5  # the sign in one half, distractors in the other
    grid, half = max(1, image_size // 8), image_size // 2
    x0 = grid * rng.randint(0, max(0, (image_size - box_w) // grid))
    y0 = (0 if top else half) + grid * rng.randint(0, max(0, (half - box_h) // grid))
    cell = image_size // 2
    for cx in rng.sample([0, 1], rng.randint(1, 2)):
        kind, color = rng.choice(SHAPES), rng.choice([c for c in SHAPE_COLORS if c != "white"])
        size = rng.randint(int(cell * 0.4), int(cell * 0.7))
        sx = cx * cell + rng.randint(1, cell - size - 1)
        sy = (cell if top else 0) + rng.randint(1, cell - size - 1)
        _draw_shape(draw, kind, (sx, sy, sx + size, sy + size), SHAPE_COLORS[color])
    draw.rectangle([x0, y0, x0 + box_w, y0 + box_h], fill=paper)
    bx0, by0, _, _ = draw.textbbox((0, 0), word, font=font)
    draw.text((x0 + pad - bx0, y0 + pad - by0), word, font=font, fill=ink)

    qtype = "word"
    question = rng.choice(["what word is written on the sign?", "what does the sign say?"])
    answer = word.lower()
    answers = [a["answer"] for a in _human_answers(rng, answer, [answer, word, word.capitalize()],
                                                   [w.lower() for w in SIGN_WORDS if w != word])]
    return {
        "image_id": f"{index:016x}", "question_id": index, "question": question,
        "question_tokens": question.rstrip("?").split(), "image": _png(img), "image_width": image_size,
        "image_height": image_size, "flickr_original_url": "", "flickr_300k_url": "", "answers": answers,
        "image_classes": ["Traffic sign" if word in ("STOP", "EXIT") else "Billboard"],
        "set_name": "train", "ocr_tokens": [word], "question_type": qtype,
    }


def doc_item(rng: random.Random, index: int, image_size: int) -> dict:
    """One form-docvqa row in the lmms-lab/DocVQA column layout: a form (from / to, the names in big glyphs) or a
    receipt (two items with prices, then the total in big glyphs). Four lines, each a quarter of the image high, at
    fixed places."""
    img = Image.new("RGB", (image_size, image_size), (rng.randint(240, 255),) * 3)
    draw = ImageDraw.Draw(img)
    small, big = _font(image_size * 3 // 16), _font(image_size // 4)
    ink, x = (rng.randint(0, 40),) * 3, max(1, image_size // 32)
    line = image_size // 4

    def write(row: float, text: str, font) -> None:
        bx0, by0, _, _ = draw.textbbox((0, 0), text, font=font)
        draw.text((x - bx0, int(row * line) + 1 - by0), text, font=font, fill=ink)

    if rng.random() < 2 / 3:
        sender, recipient = rng.sample(DOC_NAMES, 2)
        write(0, "FROM", small)
        write(1, sender, big)
        write(2, "TO", small)
        write(3, recipient, big)
        draw.line([(0, 2 * line - 1), (image_size, 2 * line - 1)], fill=(150, 150, 150))
        if rng.random() < 0.5:
            question, answer = "who is the sender?", sender
        else:
            question, answer = "who is the recipient?", recipient
        answers, qtypes = [answer, answer.capitalize()], ["form"]
    else:
        items = rng.sample(DOC_ITEMS, 2)
        total = rng.randint(2, 9)
        first = rng.randint(1, total - 1)
        for row, (item, price) in enumerate(zip(items, (first, total - first), strict=True)):
            write(row, f"{item} {price}", small)
        draw.line([(0, 2 * line - 1), (image_size, 2 * line - 1)], fill=(150, 150, 150))
        write(2, "TOTAL", small)
        write(3, str(total), big)
        question, answer = "what is the total?", str(total)
        answers, qtypes = [answer], ["layout"]
    return {
        "questionId": str(index), "question": question, "question_types": qtypes, "image": _png(img),
        "docId": index, "ucsf_document_id": f"syn{index:08d}", "ucsf_document_page_no": "1", "answers": answers,
        "data_split": "train",
    }


DIAGRAM_SHAPES = ("circle", "square", "triangle")
ARROW_DIRECTIONS = ("up", "down", "left", "right")
ARROW_COLORS = ("red", "green", "blue", "yellow", "white")
DIAGRAM_QUESTIONS = {  # kind -> question, its options in their fixed order (2-5), ScienceQA category
    "side": ("Which side of the diagram is the arrow on?", ("left", "right"), "Read diagrams"),
    "size": ("Which shape is largest?", DIAGRAM_SHAPES, "Compare sizes"),
    "direction": ("Which way does the arrow point?", ARROW_DIRECTIONS, "Read arrows in diagrams"),
    "color": ("Which color is the arrow?", ARROW_COLORS, "Identify colors"),
}
_ARROW = ((0, .3), (.5, .3), (.5, 0), (1, .5), (.5, 1), (.5, .7), (0, .7))  # pointing right, in a unit box


def _draw_arrow(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], direction: str, rgb) -> None:
    x0, y0, x1, y1 = box
    turn = {"right": lambda u, v: (u, v), "left": lambda u, v: (1 - u, v), "down": lambda u, v: (v, u),
            "up": lambda u, v: (v, 1 - u)}[direction]
    draw.polygon([(x0 + px * (x1 - x0), y0 + py * (y1 - y0)) for px, py in (turn(u, v) for u, v in _ARROW)],
                 fill=rgb)


def diagram_item(rng: random.Random, index: int, image_size: int) -> dict:
    """One diagram-scienceqa row in the lmms-lab/ScienceQA (ScienceQA-IMG) column layout: a diagram of an arrow and
    2-3 shapes of clearly different sizes, one in each quarter of the image; a question on the arrow's side (2
    options), the largest shape (3), the arrow's direction (4) or its colour (5); no hint (a "Context:" line
    would make these the longest prompts of every batch, and a batch's cost is its longest row's). Each question
    lists its options in one fixed order, so the answer's letter stands for the same thing every time (a
    ~3M-parameter model learns that within the default budget; matching shuffled options it did not) and is
    uniformly spread, as the drawn attribute is."""
    shade = rng.randint(40, 90)
    img = Image.new("RGB", (image_size, image_size), (shade, shade, shade))
    draw = ImageDraw.Draw(img)
    cell = image_size // 2
    cells = rng.sample([(0, 0), (1, 0), (0, 1), (1, 1)], 4)
    arrow_color, direction = rng.choice(ARROW_COLORS), rng.choice(ARROW_DIRECTIONS)
    size = int(cell * 0.85)
    ax, ay = cells[0][0] * cell + (cell - size) // 2, cells[0][1] * cell + (cell - size) // 2
    _draw_arrow(draw, (ax, ay, ax + size, ay + size), direction, SHAPE_COLORS[arrow_color])
    n = rng.randint(2, 3)
    kinds = rng.sample(DIAGRAM_SHAPES, n)
    scales = rng.sample([0.9, 0.6, 0.35], n)  # one clearly largest
    for kind, scale, (cx, cy) in zip(kinds, scales, cells[1:], strict=False):
        side = max(3, int(cell * scale))
        x0 = cx * cell + rng.randint(0, cell - side)
        y0 = cy * cell + rng.randint(0, cell - side)
        color = SHAPE_COLORS[rng.choice([c for c in SHAPE_COLORS if c != arrow_color])]
        _draw_shape(draw, kind, (x0, y0, x0 + side - 1, y0 + side - 1), color)

    qtype = rng.choice(list(DIAGRAM_QUESTIONS))
    question, options, category = DIAGRAM_QUESTIONS[qtype]
    truth = {"side": "left" if cells[0][0] == 0 else "right", "size": kinds[scales.index(max(scales))],
             "direction": direction, "color": arrow_color}[qtype]
    solution = {"side": f"The arrow is on the {truth}.", "size": f"The {truth} is the largest shape.",
                "direction": f"The arrow points {truth}.", "color": f"The arrow is {truth}."}[qtype]
    return {
        "image": _png(img), "question": question, "choices": list(options), "answer": options.index(truth),
        "hint": "", "task": "closed choice", "grade": rng.choice(["grade1", "grade2"]), "subject": "natural science",
        "topic": qtype, "category": category, "skill": category, "lecture": "", "solution": solution,
    }

GENERATORS = {"shapes-vqa": shapes_item, "bar-chartqa": chart_item, "sign-textvqa": sign_item,
              "form-docvqa": doc_item,
              "diagram-scienceqa": diagram_item}


def generate(name: str, size: int, seed: int, image_size: int, offset: int = 0) -> list[dict]:
    """``size`` rows of task ``name``; row i depends only on (seed, name, offset + i)."""
    make = GENERATORS[name]
    rows = []
    for i in range(offset, offset + size):
        rng = random.Random(f"{seed}:{name}:{i}")
        rows.append(make(rng, i, image_size))
    return rows
