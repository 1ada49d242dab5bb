"""Every promise a supported family keeps, written once and applied to every family's tiny model.

A family is a :class:`Family` record: a builder returning the tiny model and ``make``, which gives the inputs of
sample 0 or 1 alone or of both as one left-padded batch; the budget scopes and stages its adapter takes; whether its
prompts hold videos; and the few places where families legitimately differ (crops that share an image's budget, an
encoder that sees whole images, a FLOPs trace that splits by sample). Sample 1 always holds more than one visual
entry (two images, or a video before an image), so that ownership of visual tokens cannot be read off token order.
Each model is built once per test session (the ``fam`` fixture, :func:`subject`), with a 4-layer LM so that in-LLM
methods have layers before and after their boundaries.

The promises, as tests parametrized over the families (and a few methods: :data:`REPRESENTATIVE`):

- ``test_conformance_outputs.py``: keep-all equals vanilla, logits and ``generate`` (every method the family runs);
  a left- or right-padded batch equals each sample's own call; cached decoding equals a no-cache recompute;
- ``test_conformance_counts.py``: int budgets count per image, crop, frame or whole image / video as the scope says,
  at every stage; ratios are layer-averaged in the LM; a budget beyond the tokens is a clear error;
- ``test_conformance_hygiene.py``: the record matches the adapter; nothing stays attached after exit and a vanilla
  model in the same process is unaffected; layer parameters beyond the encoder / LM depth are refused at apply();
- ``test_conformance_measures.py``: merging methods report their merge groups; FLOPs equal
  ``torch.utils.flop_counter`` (vanilla, sieved, per sample);
- ``test_conformance_llm.py``: in-LLM pruning equals a hand-written layer loop; ToDRE's second stage.

A new family is a builder (``builders.py``) plus its record in :data:`FAMILIES`; what is specific to it stays in its
own ``test_<family>.py``.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from tokensieve import Sieve
from tokensieve.methods import get_method, method_names
from tokensieve.methods.base import IN_ENCODER, IN_LLM, POST_PROJECTOR, PRE_PROJECTOR, LLMMethod
from tokensieve.models.tiny import demo_image

from ..conftest import TINY, prompt
from . import builders as F

LAYERS = 4
"""Decoder layers of every conformance model."""


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], tuple[torch.nn.Module, Callable[[list[int]], dict]]]
    """``() -> (model, make)``; ``make(indices)`` gives the inputs of those samples, left-padded when several."""
    scopes: tuple[str, ...]
    """Budget scopes the family takes (its adapter's)."""
    stages: tuple[str, ...]
    """Stages the family runs (its adapter's)."""
    videos: bool = False
    """Sample 1 holds a video before an image."""
    crops_share_budget: bool = False
    """Report entries are crops and an image's int budget is shared out over them (Idefics3 / SmolVLM)."""
    flops_split_by_sample: bool = False
    """``trace_from_report(report, sample=i)`` can split a batch's encoder passes by sample; elsewhere (anyres
    paths that project every crop before the kept ones, Qwen's merger and windows) it is refused."""
    fixed_tokens: int | None = None
    """Every image yields this many tokens (LLaVA-1.5): keep-all is also checked as that int budget."""
    in_encoder_global: bool = False
    """The vision encoder sees a whole image or video at once, so in-encoder methods take scope ``global`` (Qwen-VL);
    elsewhere they refuse it."""
    in_encoder_exact: bool = False
    """In-encoder keep-all is bit-exact; elsewhere the re-run tower (crops, frames or windows batched its own way)
    is held to 1e-5."""


@dataclass
class Subject:
    """A built family: the model and its inputs."""

    family: Family
    model: torch.nn.Module
    _make: Callable[[list[int]], dict]

    @property
    def name(self) -> str:
        return self.family.name

    def make(self, i: int | None = None) -> dict:
        """Sample ``i`` alone, or both samples as one left-padded batch."""
        return self._make([0, 1] if i is None else [i])


# ---------------------------------------------------------------------------------------------------- builders


def _frames(seed, n=3, size=32):
    return [demo_image(size, seed + i) for i in range(n)]


def _processor_make(proc, imgs, texts):
    def make(idx):
        return proc(
            images=[im for i in idx for im in imgs[i]], text=[texts[i] for i in idx], return_tensors="pt", padding=True
        )

    return make


def _llava15():
    from tokensieve.models.tiny import build_tiny_llava

    model, proc = build_tiny_llava(**dict(TINY, text_layers=LAYERS))
    imgs = [[demo_image(96, 0)], [demo_image(96, 1), demo_image(96, 2)]]
    texts = [
        prompt(proc, "what is in the picture ?"),
        "user : <image> , <image> how many cats are on the couch ? assistant :",
    ]
    return model, _processor_make(proc, imgs, texts)


def _llava_next():
    model, proc = F.build_tiny_llava_next(text_layers=LAYERS)
    imgs = [[demo_image(64, 0).resize((64, 40))], [demo_image(64, 1).resize((30, 64)), demo_image(32, 2)]]
    texts = [prompt(proc, "what ?"), "user : <image> , <image> what is this ? assistant :"]
    return model, _processor_make(proc, imgs, texts)


def _placeholder_family(builder):
    def build():
        model, inputs = builder(text_layers=LAYERS)
        texts = ["user : <image> what ? assistant :", "user : <video> <image> what is this ? assistant :"]
        imgs = [demo_image(64, 0).resize((32, 20)), demo_image(64, 1).resize((20, 32))]
        vids = [None, _frames(5)]

        def make(idx):
            return inputs([texts[i] for i in idx], [imgs[i] for i in idx], [vids[i] for i in idx if vids[i]])

        return model, make

    return build


def _qwen(kind):
    def build():
        model, proc = F.build_tiny_qwen(kind, text_layers=LAYERS)
        texts = ["user : <image> what is this ? assistant :", "user : <video> <image> what ? assistant :"]
        imgs = [demo_image(96, 0), demo_image(64, 1)]
        vids = [None, _frames(0, 4, 64)]

        def make(idx):
            videos = [vids[i] for i in idx if vids[i]]
            return proc([texts[i] for i in idx], images=[imgs[i] for i in idx], videos=videos)

        return model, make

    return build


def _idefics3(smolvlm=False):
    def build():
        model, proc = F.build_tiny_idefics3(text_layers=LAYERS, smolvlm=smolvlm)
        big, small = demo_image(64, 0).resize((60, 40)), demo_image(64, 1).resize((64, 20))
        imgs, texts = [[small], [big, small]], [prompt(proc, "what ?"), prompt(proc, "what is this ?", 2)]

        def make(idx):
            return proc(images=[imgs[i] for i in idx], text=[texts[i] for i in idx], return_tensors="pt", padding=True)

        return model, make

    return build


ALL_STAGES = (PRE_PROJECTOR, POST_PROJECTOR, IN_ENCODER, IN_LLM)

FAMILIES = {
    f.name: f
    for f in [
        Family(
            "llava15",
            _llava15,
            ("image", "crop"),
            ALL_STAGES,
            flops_split_by_sample=True,
            fixed_tokens=64,
            in_encoder_exact=True,
        ),
        Family("llava_next", _llava_next, ("image", "crop", "global"), ALL_STAGES),
        Family(
            "llava_next_video",
            _placeholder_family(F.build_tiny_llava_next_video),
            ("image", "crop", "frame", "global"),
            ALL_STAGES,
            videos=True,
        ),
        Family(
            "llava_onevision",
            _placeholder_family(F.build_tiny_onevision),
            ("image", "crop", "frame", "global"),
            ALL_STAGES,
            videos=True,
        ),
        Family(
            "qwen2_vl", _qwen("qwen2_vl"), ("image", "frame", "global"), ALL_STAGES, videos=True, in_encoder_global=True
        ),
        Family(
            "qwen2_5_vl",
            _qwen("qwen2_5_vl"),
            ("image", "frame", "global"),
            ALL_STAGES,
            videos=True,
            in_encoder_global=True,
        ),
        Family(
            "idefics3",
            _idefics3(),
            ("image", "crop", "global"),
            ALL_STAGES,
            crops_share_budget=True,
            flops_split_by_sample=True,
        ),
        Family(
            "smolvlm",
            _idefics3(smolvlm=True),
            ("image", "crop", "global"),
            ALL_STAGES,
            crops_share_budget=True,
            flops_split_by_sample=True,
        ),
    ]
}


@functools.cache
def subject(name: str) -> Subject:
    """The family's tiny model, built once per test session."""
    family = FAMILIES[name]
    model, make = family.build()
    return Subject(family, model, make)


def vanilla(s: Subject) -> tuple[torch.Tensor, torch.Tensor]:
    """The uncompressed model's logits and greedy tokens on the padded batch, computed once per session."""
    return _vanilla(s.name)


@functools.cache
def _vanilla(name):
    s = subject(name)
    return logits(s.model, s.make()), generate(s.model, s.make())


# ------------------------------------------------------------------------------------------------------ calls


def logits(model, inputs, **kw):
    with torch.inference_mode():
        return model(**inputs, **kw).logits


def generate(model, inputs, n=5, **kw):
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)


def layer_hooks(model) -> int:
    return sum(len(layer._forward_pre_hooks) for layer in model.get_decoder().layers)


def visual_ids(model) -> list[int]:
    return [model.config.image_token_id] + (
        [model.config.video_token_id] if getattr(model.config, "video_token_id", None) is not None else []
    )


def placeholders(model, inputs) -> list[int]:
    """Visual placeholders per sample."""
    return torch.isin(inputs["input_ids"], torch.tensor(visual_ids(model))).sum(1).tolist()


IN_LLM_PARAMS = {"fastv": {"layer": 1}, "dart": {"layer": 1}}
"""In-LLM methods prune after decoder layer 1 of the 4 (PDrop keeps its default quarters)."""


def sieve_for(spec: str, budget) -> Sieve:
    """``Sieve`` of one method (in-LLM ones after layer 1), or of a chain ``"pre+in_llm"`` with budgets ``[budget,
    budget * 2 / 3]``."""
    if "+" in spec:
        pre, llm = spec.split("+")
        return Sieve([get_method(pre)(), get_method(llm)(**IN_LLM_PARAMS.get(llm, {}))], [budget, budget * 2 / 3])
    return Sieve(spec, budget, **IN_LLM_PARAMS.get(spec, {}))


def runs_in_llm(spec: str) -> bool:
    return any(get_method(m).stage == IN_LLM or get_method(m)().llm_companion() is not None for m in spec.split("+"))


def image_sets(s: Subject, inputs, images) -> list[list]:
    """The report's entries grouped by image or video: one entry each, except where entries are the crops of an
    image (Idefics3), told apart the way the adapter groups them."""
    if not s.family.crops_share_budget:
        return [[im] for im in images]
    owners = [im.crop_of for im in images]  # the image each crop entry belongs to, as the adapter grouped them
    return [[im for im, o in zip(images, owners) if o == i] for i in sorted(set(owners))]


def _own(hooks) -> int:
    # transformers installs output-capturing hooks of its own the first time a call asks for hidden states or
    # attentions, and keeps them: those are not a sieve's
    return sum("output_capturing_hook" not in getattr(h, "__qualname__", "") for h in hooks.values())


def snapshot(model):
    """Everything a sieve may touch: instance attributes, hooks of every module (but transformers' own), weights."""
    hooks = {
        name: (_own(m._forward_hooks), _own(m._forward_pre_hooks), _own(m._backward_hooks))
        for name, m in model.named_modules()
    }
    return set(model.__dict__), hooks, {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(a, b):
    assert a[0] == b[0], a[0] ^ b[0]
    assert a[1] == b[1]
    assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


def right_padded(batch: dict) -> dict:
    """The same batch with every row's real tokens moved to the front (right padding), per-token inputs along."""
    order = torch.argsort((batch["attention_mask"] == 0).long(), dim=1, stable=True)
    out = dict(batch)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in batch:
            out[key] = torch.gather(batch[key], 1, order)
    return out


# ------------------------------------------------------------------------------------------------ parametrizing

NAMES = list(FAMILIES)

REPRESENTATIVE = ["evocut", "divprune", "visionzip", "evoprune", "fastv"]
"""One method per kind: pre-projector, post-projector, merging, in-encoder, in-LLM."""


def pairs(methods, families=None) -> list:
    """``(family, method)`` parameters for ``@pytest.mark.parametrize("fam,method", ..., indirect=["fam"])``;
    ``methods`` is a list or a function of the family."""
    out = []
    for name in families or NAMES:
        for m in methods(FAMILIES[name]) if callable(methods) else methods:
            out.append(pytest.param(name, m, id=f"{name}-{m}"))
    return out


def runnable(family: Family) -> list[str]:
    """Every registered method whose stages (an in-LLM companion included) the family runs."""
    out = []
    for name in method_names():
        method = get_method(name)()
        stages = {method.stage} | ({IN_LLM} if method.llm_companion() is not None else set())
        if stages <= set(family.stages):
            out.append(name)
    return out


@functools.cache
def twin(name: str) -> torch.nn.Module:
    """An independent copy of the family's model that is never sieved."""
    return copy.deepcopy(subject(name).model)


class Replay(LLMMethod):
    """Records an in-LLM method's selections in call order on the first forward and replays them later (a batch
    calls the method once per sample, so selections are keyed by call order rather than by layer): the same pruning
    for a no-cache recompute."""

    name = "replay"
    description = "test helper"

    def __init__(self, inner):
        self.inner, self.recording, self.saved, self.i = inner, True, [], 0
        self.query, self.attention_from = inner.query, inner.attention_from
        self.needs_keys, self.budgeted, self.final_norm = inner.needs_keys, inner.budgeted, inner.final_norm

    def schedule(self, n, num_layers, target):
        return self.inner.schedule(n, num_layers, target)

    def select_llm(self, signals, ks):
        if self.recording:
            self.saved.append(self.inner.select_llm(signals, ks))
            return self.saved[-1]
        out = self.saved[self.i % len(self.saved)]
        self.i += 1
        return out
