"""Conformance, in the LM: pruning inside the LM equals a hand-written layer loop (the LM's layers run by hand, the
kept tokens' positions and rotary carried along), and ToDRE's second stage removes every visual token, on every
family. Prompts mix images and videos where the model takes both, with the video first in one sample, so that
ownership of visual slots cannot be read off token order."""

import pytest
import torch

from tokensieve import Sieve
from tokensieve.methods.base import LLMMethod
from tokensieve.methods.todre import ToDRERelevance

from .conformance import LAYERS, NAMES, generate, layer_hooks, logits, visual_ids


def _visual_runs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Maximal runs of one visual token id in a 1-D prompt: each image, crop or video, told apart independently."""
    vis_ids = visual_ids(model)
    runs, cur, prev = [], [], None
    for p, t in enumerate(ids.tolist()):
        if t in vis_ids and (t == prev or not cur):
            cur.append(p)
        elif t in vis_ids:
            runs.append(torch.tensor(cur))
            cur = [p]
        elif cur:
            runs.append(torch.tensor(cur))
            cur = []
        prev = t
    if cur:
        runs.append(torch.tensor(cur))
    return runs


class EveryOther(LLMMethod):
    """After ``layer``, keep the even-numbered visual tokens of each image, crop or video: a known pruning."""

    name = "every-other"
    description = "test helper"
    budgeted = False

    def __init__(self, layer):
        self.layer = layer

    def schedule(self, n, num_layers, target):
        return [(self.layer, (n + 1) // 2)]

    def select_llm(self, signals, ks):
        return [torch.arange(0, n, 2) for n in signals.segments]


@pytest.mark.parametrize("fam", NAMES, indirect=True)
def test_forward_equals_a_hand_written_layer_loop(fam):
    """One unpadded sample: the LM's layers run by hand, the even tokens of every visual run kept after layer 2."""
    model, one = fam.model, fam.make(1)
    ids = one["input_ids"][0]
    captured = {}

    def grab(mod, args, kwargs):
        captured.setdefault("h", args[0] if args else kwargs["hidden_states"])
        captured.setdefault("pe", kwargs["position_embeddings"])

    layers = model.get_decoder().layers
    h = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        logits(model, one)
    finally:
        h.remove()
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    runs = _visual_runs(model, ids)
    assert len(runs) >= 2
    for run in runs:
        keep[run[1::2]] = False
    kept = keep.nonzero().flatten()
    x, (cos, sin) = captured["h"], captured["pe"]
    with torch.inference_mode():
        for i, layer in enumerate(layers):
            if i == 2:
                x, cos, sin = x[:, kept], cos[:, kept], sin[:, kept]
            x = layer(x, attention_mask=None, position_embeddings=(cos, sin))
            x = x[0] if isinstance(x, tuple) else x
        ref = model.lm_head(model.get_decoder().norm(x))[0]
    sieve = Sieve(EveryOther(2), 1)
    with sieve(model):
        got = logits(model, one)[0]
    rep = sieve.last_report
    assert torch.equal(rep.llm_kept_positions[0], kept)
    assert (
        rep.llm_layer_visual_tokens[0]
        == [sum(r.numel() for r in runs)] * 2 + [sum((r.numel() + 1) // 2 for r in runs)] * 2
    )
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fam", NAMES, indirect=True)
def test_todre_relevance_removes_every_visual_token_below_tau(fam):
    """ToDRE's two stages: diversity after the projector, then all visual tokens leave at 7/8 depth when the text
    attends to them less than tau (0.99: always; 0.01: never on these random weights)."""
    model, one = fam.model, fam.make(1)
    removed, kept = Sieve("todre", 0.5, tau=0.99), Sieve("todre", 0.5, tau=0.01)
    for sieve in (removed, kept):
        with sieve(model):
            generate(model, one, n=2)
    n = sum(im.tokens_out for im in removed.last_report.images)
    layer = ToDRERelevance().schedule(n, LAYERS, None)[0][0]  # the checked depth, 7/8 of 4 layers
    assert removed.last_report.llm_layer_visual_tokens[0] == [n] * layer + [0] * (LAYERS - layer)
    assert kept.last_report.llm_layer_visual_tokens[0] == [n] * LAYERS
    assert layer_hooks(model) == 0
