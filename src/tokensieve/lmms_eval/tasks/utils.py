"""Docs, images and scoring of the two offline tasks; lmms-eval loads this file by path (``!function utils.x``).

The questions are not copied into the task folder: ``process_docs`` expands a one-row stub into the test split as
``tokensieve.data`` defines it (easy-VQA read from the installed ``easy-vqa`` wheel, shapes generated from seeds),
so the tasks cannot drift from ``tokensieve eval``. Images are loaded or rendered when a document is asked for
its visual. Scoring is ``tokensieve eval``'s: the generated text, stripped and lower-cased, equals the answer.
"""

from __future__ import annotations

from functools import lru_cache

import datasets

from tokensieve.data import easyvqa, shapes


def _docs(name: str, split: str) -> list[dict]:
    if name == "easyvqa":
        return [
            {"index": i, "image_id": image_id, "question": q, "answer": a, "family": easyvqa.family(a)}
            for i, (q, a, image_id) in enumerate(easyvqa.questions(split))
        ]
    if name == "shapes":
        return [
            {"index": s.index, "image_id": s.index, "question": s.question, "answer": s.answer, "family": s.family}
            for s in shapes.dataset(split)
        ]
    raise ValueError(f"unknown tokensieve task data {name!r}")


def process_docs(stub: datasets.Dataset) -> datasets.Dataset:
    """The stub's one row names the data set and split; the result has one row per question, in the set's order."""
    if len(stub) != 1:
        raise ValueError(f"a tokensieve task stub has exactly one row, got {len(stub)}")
    row = stub[0]
    return datasets.Dataset.from_list(_docs(row["dataset"], row["split"]))


@lru_cache(maxsize=64)
def _shapes_image(index: int):
    return shapes.sample("test", index).image


def easyvqa_doc_to_visual(doc: dict) -> list:
    return [easyvqa.load_image("test", doc["image_id"])]


def shapes_doc_to_visual(doc: dict) -> list:
    return [_shapes_image(doc["index"]).copy()]


def doc_to_text(doc: dict) -> str:
    return doc["question"]


def doc_to_target(doc: dict) -> str:
    return doc["answer"]


def process_results(doc: dict, results: list) -> dict:
    answer = (results[0] or "").strip().lower()
    return {"exact_match": float(answer == doc["answer"])}
