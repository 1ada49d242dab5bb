"""Hand-made signals for the selector tests: a batch of random hidden states, CLS attention, keys and received
attention on a 6 x 6 grid, and ``run`` which hands a method only the signals it asked for."""

from __future__ import annotations

import torch

from tokensieve.methods import Layout, Selection, Signals, get_method, method_names
from tokensieve.methods.base import POST_PROJECTOR, PRE_PROJECTOR

PRE = [n for n in method_names() if get_method(n).stage in (PRE_PROJECTOR, POST_PROJECTOR)]  # the Signals contract

B, GRID, D, HEADS, HEAD_DIM = 2, (6, 6), 16, 4, 8
N = GRID[0] * GRID[1]
NUM_LAYERS, FEATURE_LAYER = 6, 5
# selectors on post-encoder signals; in-encoder ones: test_in_encoder_selectors.py, tests/engine/test_encoder_stage.py
SELECTORS = PRE


def make_signals(seed: int = 0, b: int = B, grid=GRID, d: int = D, num_prefix: int = 0) -> Signals:
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1] + num_prefix
    hidden = {i: torch.randn(b, n, d, generator=g) for i in range(NUM_LAYERS + 1)}
    attention = {
        i: torch.softmax(torch.randn(b, HEADS, n + 1, generator=g) * 3, dim=-1)[..., 1:] for i in range(NUM_LAYERS)
    }
    keys = {i: torch.randn(b, HEADS, n, HEAD_DIM, generator=g) for i in range(NUM_LAYERS)}
    received = {i: torch.rand(b, n, generator=g) / n for i in range(NUM_LAYERS)}
    return Signals(
        features=hidden[FEATURE_LAYER].clone(),
        layout=Layout(grid=grid, num_prefix=num_prefix),
        num_layers=NUM_LAYERS,
        feature_layer=FEATURE_LAYER,
        hidden_states=hidden,
        cls_attention=attention,
        keys=keys,
        cls_hidden=torch.randn(b, d, generator=g),
        attention_received=received,
    )


def image(signals: Signals, i: int) -> Signals:
    """The signals of image ``i`` alone, as a batch of one."""
    return signals.row(i)


def run(name: str, signals: Signals, k: int, **params) -> Selection:
    method = get_method(name)(**params)
    request = method.request(signals.num_layers, signals.feature_layer)
    # the method must only need what it asked for
    kept = Signals(
        features=signals.features,
        layout=signals.layout,
        num_layers=signals.num_layers,
        feature_layer=signals.feature_layer,
        hidden_states={i: signals.hidden_states[i] for i in request.hidden_states},
        cls_attention={i: signals.cls_attention[i] for i in request.cls_attention},
        keys={i: signals.keys[i] for i in request.keys},
        cls_hidden=signals.cls_hidden if request.cls_hidden else None,
        attention_received={i: signals.attention_received[i] for i in request.attention_received},
    )
    return method.select(kept, k)
