"""How many images the DreamBooth protocol draws: `images_per_prompt` per eval prompt, and
`prior_images` (default: the same) of the class prompt, each image i with seed + i."""

from __future__ import annotations

import types

import torch
from PIL import Image

from t2ilab.metrics.protocol import DreamBoothProtocol

SUBJECT = "data/toy_subjects/striped_star"


class FakePipe:
    """Records each call's prompts and seeds; draws a grey image per prompt."""

    device = torch.device("cpu")

    def __init__(self):
        self.calls = []

    def __call__(self, prompt, generator, **kwargs):
        self.calls.append((list(prompt), [g.initial_seed() for g in generator]))
        return types.SimpleNamespace(images=[Image.new("RGB", (8, 8), "gray") for _ in prompt])


def _protocol(**cfg):
    base = {
        "prompts": ["a {identifier} {class_noun}", "a {identifier} {class_noun}, top left"],
        "prior_prompt": "a {class_noun}",
        "images_per_prompt": 3,
        "num_inference_steps": 1,
        "guidance_scale": 1.0,
        "batch_size": 4,
        "seed": 10,
        "div_distance": None,
    }
    return DreamBoothProtocol({**base, **cfg}, SUBJECT, "sks", "star")


def _run(protocol):
    pipe, seen = FakePipe(), {}
    protocol.score = lambda generations, prior: seen.update(gen=generations, prior=prior)
    protocol.run(pipe)
    return pipe, seen


def test_the_prior_prompt_gets_images_per_prompt_by_default():
    _, seen = _run(_protocol())
    assert {p: len(v) for p, v in seen["gen"].items()} == {
        "a sks star": 3,
        "a sks star, top left": 3,
    }
    assert len(seen["prior"]) == 3


def test_prior_images_sets_the_class_prompt_count_alone():
    pipe, seen = _run(_protocol(prior_images=10))
    assert [len(v) for v in seen["gen"].values()] == [3, 3]
    assert len(seen["prior"]) == 10
    prior_seeds = [
        s
        for prompts, seeds in pipe.calls
        for p, s in zip(prompts, seeds, strict=True)
        if p == "a star"
    ]
    assert prior_seeds == list(range(10, 20))  # image i with seed + i, as every prompt
