"""Procedurally generated, learnable VQA/ChartQA-style tasks (deterministic for a given seed).

* ``shapes-vqa`` (VQAv2 layout): 1-3 coloured shapes; colour, shape, count and yes/no presence questions,
  each with 10 "human" answers that vary the way people do ("2"/"two", "Red.", an occasional dissenter).
* ``bar-chartqa`` (HuggingFaceM4/ChartQA layout): 3-5 coloured bars; bar value (numeric, relaxed accuracy),
  highest/lowest colour, and bar count questions.
"""
from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw

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


GENERATORS = {"shapes-vqa": shapes_item, "bar-chartqa": chart_item}


def generate(name: str, size: int, seed: int, image_size: int, offset: int = 0) -> list[dict]:
    """``size`` rows of task ``name``; row i depends only on (seed, name, offset + i)."""
    make = GENERATORS[name]
    rows = []
    for i in range(offset, offset + size):
        rng = random.Random(f"{seed}:{name}:{i}")
        rows.append(make(rng, i, image_size))
    return rows
