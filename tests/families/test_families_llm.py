"""The in-LLM stage on every non-LLaVA-1.5 family: keep-all equivalence, budgets by scope, padded batches equal to
single calls, cached decoding equal to a recompute, and a hand-written layer loop as the reference.

Each family is built with a 4-layer LM (the family fixtures elsewhere have 2) so that FastV / PDrop / DART have
layers before and after their boundaries. Prompts mix images and videos where the model takes both, with the
video first in one sample so that ownership of visual slots cannot be read off token order.
"""

import pytest
import torch

from tokensieve import Sieve
from tokensieve.errors import BudgetError
from tokensieve.methods.base import LLMMethod
from tokensieve.methods.todre import ToDRERelevance
from tokensieve.models.tiny import demo_image

from ..conftest import prompt
from ..engine.test_llm_stage import Replay as _Replay
from ..engine.test_llm_stage import generate as _generate
from ..engine.test_llm_stage import layer_hooks as _hooks
from ..engine.test_llm_stage import logits as _logits
from . import builders as F

LAYERS = 4
IN_LLM = ["fastv", "pdrop", "dart"]
FAMILIES = ["llava_next", "llava_next_video", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3"]


def _frames(seed, n=3, size=32):
    return [demo_image(size, seed + i) for i in range(n)]


def _build(name):
    """``(model, make)``: ``make(i)`` gives the inputs of sample i alone, ``make(None)`` the padded batch of both."""
    if name == "llava_next":
        model, proc = F.build_tiny_llava_next(text_layers=LAYERS)
        imgs = [[demo_image(64, 0).resize((64, 40))], [demo_image(64, 1).resize((30, 64)), demo_image(32, 2)]]
        texts = [prompt(proc, "what ?"), "user : <image> , <image> what is this ? assistant :"]
        make = lambda idx: proc(  # noqa: E731
            images=[im for i in idx for im in imgs[i]], text=[texts[i] for i in idx], return_tensors="pt", padding=True
        )  # noqa: E731
    elif name in ("llava_next_video", "llava_onevision"):
        builder = F.build_tiny_llava_next_video if name == "llava_next_video" else F.build_tiny_onevision
        model, inputs = builder(text_layers=LAYERS)
        texts = ["user : <image> what ? assistant :", "user : <video> <image> what is this ? assistant :"]
        imgs = [demo_image(64, 0).resize((32, 20)), demo_image(64, 1).resize((20, 32))]
        vids = [None, _frames(5)]
        make = lambda idx: inputs([texts[i] for i in idx], [imgs[i] for i in idx], [vids[i] for i in idx if vids[i]])  # noqa: E731
    elif name.startswith("qwen"):
        model, proc = F.build_tiny_qwen(name, text_layers=LAYERS)
        texts = ["user : <image> what is this ? assistant :", "user : <video> <image> what ? assistant :"]
        imgs = [demo_image(96, 0), demo_image(64, 1)]
        vids = [None, _frames(0, 4, 64)]

        def make(idx):
            videos = [vids[i] for i in idx if vids[i]]
            return proc([texts[i] for i in idx], images=[imgs[i] for i in idx], videos=videos)
    elif name == "idefics3":
        model, proc = F.build_tiny_idefics3(text_layers=LAYERS)
        big, small = demo_image(64, 0).resize((60, 40)), demo_image(64, 1).resize((64, 20))
        imgs, texts = [[small], [big, small]], [prompt(proc, "what ?"), prompt(proc, "what is this ?", 2)]
        make = lambda idx: proc(  # noqa: E731
            images=[imgs[i] for i in idx], text=[texts[i] for i in idx], return_tensors="pt", padding=True
        )  # noqa: E731
    else:
        raise ValueError(name)
    return model, lambda i=None: make([0, 1] if i is None else [i])


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model, make = _build(request.param)
    return request.param, model, make


def _visual_runs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Maximal runs of one visual token id in a 1-D prompt: each image, crop or video, told apart independently."""
    vis_ids = [model.config.image_token_id] + (
        [model.config.video_token_id] if getattr(model.config, "video_token_id", None) is not None else []
    )
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


class Replay(_Replay):
    """Records a method's selections in call order on the first forward and replays them later (a batch calls the
    method once per sample, so selections are keyed by call order rather than by layer)."""

    def __init__(self, inner):
        super().__init__(inner)
        self.saved, self.i = [], 0

    def select_llm(self, signals, ks):
        if self.recording:
            self.saved.append(self.inner.select_llm(signals, ks))
            return self.saved[-1]
        out = self.saved[self.i % len(self.saved)]
        self.i += 1
        return out


# ------------------------------------------------------------------------------------------------ equivalences


@pytest.mark.parametrize("method", IN_LLM)
def test_keep_all_equals_vanilla(family, method):
    _, model, make = family
    batch = make()
    want, want_gen = _logits(model, batch), _generate(model, batch)
    sieve = Sieve(method, 1.0, **({"layer": 1} if method != "pdrop" else {}))
    with sieve(model):
        got, got_gen = _logits(model, batch), _generate(model, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_gen, want_gen)
    visual = sieve.last_report.llm_layer_visual_tokens
    assert all(len(set(v)) == 1 for v in visual) and visual[0][0] > 0
    assert _hooks(model) == 0


def test_forward_equals_a_hand_written_layer_loop(family):
    """One unpadded sample: the LM's layers run by hand, the even tokens of every visual run kept after layer 2."""
    _, model, make = family
    one = make(1)
    ids = one["input_ids"][0]
    captured = {}

    def grab(mod, args, kwargs):
        captured.setdefault("h", args[0] if args else kwargs["hidden_states"])
        captured.setdefault("pe", kwargs["position_embeddings"])

    layers = model.get_decoder().layers
    h = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _logits(model, one)
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
        got = _logits(model, one)[0]
    rep = sieve.last_report
    assert torch.equal(rep.llm_kept_positions[0], kept)
    assert (
        rep.llm_layer_visual_tokens[0]
        == [sum(r.numel() for r in runs)] * 2 + [sum((r.numel() + 1) // 2 for r in runs)] * 2
    )
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["fastv", "dart"])
def test_padded_batch_equals_single_calls(family, method):
    _, model, make = family
    batch = make()
    sieve = Sieve(method, 0.6, layer=1)
    with sieve(model):
        together = _generate(model, batch)
        counts = sieve.last_report.llm_layer_visual_tokens
        per_image = [im.llm_layer_tokens for im in sieve.last_report.images]
        singles = []
        for i in range(2):
            alone = make(i)
            singles.append((_generate(model, alone)[0, alone["input_ids"].shape[1] :], sieve.last_report))
    n_in = batch["input_ids"].shape[1]
    for s, (ans, rep) in enumerate(singles):
        assert torch.equal(together[s, n_in:], ans)
        assert counts[s] == rep.llm_layer_visual_tokens[0]
    assert sorted(map(tuple, per_image)) == sorted(tuple(im.llm_layer_tokens) for _, r in singles for im in r.images)
    assert counts[0][0] > counts[0][-1]


def right_padded(batch: dict) -> dict:
    """The same batch with every row's real tokens moved to the front (right padding), per-token inputs along."""
    order = torch.argsort((batch["attention_mask"] == 0).long(), dim=1, stable=True)
    out = dict(batch)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in batch:
            out[key] = torch.gather(batch[key], 1, order)
    return out


def test_right_padded_batch_equals_single_calls(family):
    """generate() on a right-padded batch answers what each prompt answers alone (the shrunk prompt is re-padded on
    the left for generation), here with a pre-LLM and an in-LLM stage chained; forward() keeps the caller's right
    padding and its logits match the single calls."""
    from tokensieve.methods import get_method

    _, model, make = family
    batch = right_padded(make())
    assert bool((batch["attention_mask"][:, -1] == 0).any()) and bool(batch["attention_mask"][:, 0].all())
    chain = Sieve([get_method("evocut")(), get_method("fastv")(layer=1)], [0.6, 0.4])
    with chain(model):
        together = _generate(model, batch)
        left = chain.last_report.attention_mask
        answers = [_generate(model, make(i))[0, make(i)["input_ids"].shape[1] :] for i in range(2)]
    assert bool(left[:, -1].all()), "generation ran on a left-padded shrunk batch"
    n_in = batch["input_ids"].shape[1]
    assert torch.equal(together[:, :n_in], batch["input_ids"]), "the caller's own prompt comes back in front"
    for s, ans in enumerate(answers):
        assert torch.equal(together[s, n_in:], ans)
    sieve = Sieve("evocut", 0.6)
    with sieve(model):
        full = _logits(model, batch)
        mask = sieve.last_report.attention_mask
        refs = [_logits(model, make(i))[0] for i in range(2)]
    assert not bool(mask[:, -1].all()), "forward keeps the caller's right padding"
    for s, ref in enumerate(refs):
        torch.testing.assert_close(full[s][mask[s].bool()], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["fastv", "pdrop"])
def test_cached_decoding_equals_no_cache_recompute(family, method):
    """Greedy generate with the KV cache == step-by-step recompute without cache, under the same pruning."""
    _, model, make = family
    one = make(1)
    replay = Replay(Sieve(method, 0.6, **({"layer": 1} if method == "fastv" else {})).llm_method)
    sieve = Sieve(replay, 0.6)
    with sieve(model):
        out = _generate(model, one, n=4, return_dict_in_generate=True, output_logits=True)
    replay.recording = False
    lengths = [out.past_key_values.layers[i].get_seq_length() for i in range(LAYERS)]
    assert lengths[0] > lengths[-1]
    seq, n_prompt = out.sequences, one["input_ids"].shape[1]
    with sieve(model):
        for t in range(seq.shape[1] - n_prompt):
            ids = seq[:, : n_prompt + t]
            extra = {}
            if "mm_token_type_ids" in one:  # Qwen's processor output: generated tokens are text (type 0)
                extra["mm_token_type_ids"] = torch.nn.functional.pad(one["mm_token_type_ids"], (0, t))
            step = _logits(
                model, dict(one, input_ids=ids, attention_mask=torch.ones_like(ids), **extra), use_cache=False
            )
            torch.testing.assert_close(step[:, -1], out.logits[t], rtol=1e-4, atol=1e-4)


def test_todre_relevance_removes_every_visual_token_below_tau(family):
    """ToDRE's two stages: diversity after the projector, then all visual tokens leave at 7/8 depth when the text
    attends to them less than tau (0.99: always; 0.01: never on these random weights)."""
    _, model, make = family
    one = make(1)
    removed, kept = Sieve("todre", 0.5, tau=0.99), Sieve("todre", 0.5, tau=0.01)
    for sieve in (removed, kept):
        with sieve(model):
            _generate(model, one, n=2)
    n = sum(im.tokens_out for im in removed.last_report.images)
    layer = ToDRERelevance().schedule(n, LAYERS, None)[0][0]  # the checked depth, 7/8 of 4 layers
    assert removed.last_report.llm_layer_visual_tokens[0] == [n] * layer + [0] * (LAYERS - layer)
    assert kept.last_report.llm_layer_visual_tokens[0] == [n] * LAYERS
    assert _hooks(model) == 0


# ------------------------------------------------------------------------------------------------------ budgets


class KeepTarget(LLMMethod):
    """Keeps exactly the resolved target of each entry after layer 1, so a test reads what a budget resolved to."""

    name = "keep-target"
    description = "test helper"

    def schedule(self, n, num_layers, target):
        return [(1, target)]

    def select_llm(self, signals, ks):
        return [torch.arange(k) for k in ks]


def _targets(model, one, value, scope="image"):
    sieve = Sieve(KeepTarget(), value, scope=scope)
    with sieve(model):
        _generate(model, one, n=1)
    rep = sieve.last_report
    return rep.images, [im.llm_layer_tokens[-1] for im in rep.images]


def test_int_budgets_follow_the_scope(family):
    """Per image by default (Idefics3: shared over the image's crops), per crop on anyres, per frame for videos."""
    name, model, make = family
    one = make(1)
    value = 8 if name == "idefics3" else 2
    images, kept = _targets(model, one, value)
    if name == "idefics3":  # two images of 5 and 3 crops, each image's 8 shared out over its crops
        assert [im.frames for im in images] == [0] * 8 and sum(kept) == 2 * value and min(kept) >= 1
        assert sum(kept[:5]) == value
    else:
        assert kept == [value * (im.frames or 1) for im in images]
        assert any(im.frames for im in images) == (name != "llava_next")
    if name.startswith("llava_next") or name == "llava_onevision":
        images, kept = _targets(model, one, value, "crop")
        assert kept == [value * (im.frames or im.crops) for im in images]
        assert any(im.crops > 1 for im in images if not im.frames)


def test_global_int_budget_is_per_whole_image_or_video(family):
    """As before the LM: ``global`` is k per image or per whole video (Idefics3: shared over the image's crops)."""
    name, model, make = family
    images, kept = _targets(model, make(1), 8, "global")
    if name == "idefics3":
        assert sum(kept[:5]) == 8 and sum(kept[5:]) == 8
    else:
        assert kept == [8] * len(images) and any(im.frames > 1 for im in images) == (name != "llava_next")


def test_ratio_budget_is_layer_averaged_per_entry(family):
    _, model, make = family
    sieve = Sieve("fastv", 0.6, layer=1)
    with sieve(model):
        _generate(model, make(1), n=1)
    for im in sieve.last_report.images:
        # the ratio resolves to a whole target, which a one-boundary plan meets up to rounding its kept count
        assert abs(im.llm_tokens_avg - round(0.6 * im.tokens_out)) <= 0.5


def test_budget_beyond_the_tokens_is_a_clear_error(family):
    _, model, make = family
    with Sieve("fastv", 100000, layer=1)(model):
        with pytest.raises(BudgetError, match="exceeds"):
            _generate(model, make(0), n=1)
    assert _hooks(model) == 0
