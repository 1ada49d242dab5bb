"""Timing and memory of one ``generate()`` call, split into the parts users ask about.

Why these definitions:

* **Time to first token** ends when ``generate`` hands the first new token to its streamer, so it includes vision,
  selection, prefill, the LM head and the first sampling step, and nothing after. On CUDA the clock is CUDA events
  recorded on the current stream (the streamer receives tokens already copied to the host, so the host has waited
  for them).
* **Vision** is the window from the vision tower's first forward to the projector's last one, minus any selection
  that ran inside that window (pre-projector and in-encoder methods select there). **Selection** is the report's
  ``selection_s``. **Prefill** is what is left of time to first token: the LM's prompt pass plus the adapter's
  placeholder bookkeeping.
* **Decode** is the mean time per new token after the first.
* **Peak memory** on CPU is the rise of the process's resident-set high-water mark over its resident size when the
  call started (Linux ``/proc/self/clear_refs`` resets the mark per call). It sees torch's allocations, which
  ``tracemalloc`` does not, but also the allocator's caching: memory freed and kept by the allocator in an earlier
  call is not counted again, so compare configurations measured the same way. On CUDA it is
  ``max_memory_allocated`` minus the allocation at the start.
* **KV-cache bytes** are the bytes of the key and value tensors in the cache ``generate`` returns (padding included:
  it is allocated).
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..methods.base import IN_ENCODER, PRE_PROJECTOR

_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class CallTiming:
    ttft_s: float
    vision_s: float
    selection_s: float
    prefill_s: float
    decode_ms_per_token: float | None
    """``None`` when only one token was generated."""
    new_tokens: int
    peak_memory_bytes: int | None
    kv_cache_bytes: int
    memory_method: str

    def to_dict(self) -> dict:
        return dict(vars(self))


class _TokenClock:
    """A streamer that only timestamps: ``generate`` calls ``put`` with the prompt, then with each new token."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: list = []

    def now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def put(self, value) -> None:
        self.marks.append(self.now())

    def end(self) -> None:
        pass


def _elapsed(a, b) -> float:
    if isinstance(a, float):
        return b - a
    b.synchronize()
    return a.elapsed_time(b) / 1e3


def vision_modules(model):
    """(vision tower, projector) of a supported model, whose forward calls bound the vision time (the family's
    adapter names them: Qwen-VL's merger MLP and Idefics3's connector projection are its projector)."""
    from ..adapters import get_adapter

    return get_adapter(model).vision_modules()


@contextmanager
def _vision_window(model, clock: _TokenClock):
    tower, projector = vision_modules(model)
    marks: dict = {}

    def start(*_):
        marks.setdefault("start", clock.now())

    def stop(*_):
        marks["stop"] = clock.now()

    hooks = [tower.register_forward_pre_hook(start), projector.register_forward_hook(stop)]
    try:
        yield marks
    finally:
        for h in hooks:
            h.remove()


def _rss() -> tuple[int, int]:
    """(current, high-water) resident set in bytes, from /proc/self/status."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, amount, _unit = line.split()
            values[key[:-1]] = int(amount) * 1024
    return values["VmRSS"], values["VmHWM"]


class _PeakMemory:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.method = "cuda max_memory_allocated" if self.cuda else "rss high-water rise (/proc)"
        self.peak: int | None = None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        try:
            _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
            self.base = _rss()[0]
        except OSError:
            self.method, self.base = "unavailable (no /proc)", None
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        elif self.base is not None:
            self.peak = max(0, _rss()[1] - self.base)


def cache_bytes(cache) -> int:
    """Bytes held by the key/value tensors of a transformers cache object (or legacy tuple of tuples)."""
    if cache is None:
        return 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        pairs = [(getattr(lay, "keys", None), getattr(lay, "values", None)) for lay in layers]
    else:
        pairs = cache
    total = 0
    for pair in pairs:
        for t in pair:
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def measure_call(model, batch: dict, sieve=None, new_tokens: int = 8) -> tuple[CallTiming, object]:
    """Run one greedy ``generate`` of exactly ``new_tokens`` tokens (vanilla, or under ``sieve``) and time it.

    Returns the timing and the sieve's report (``None`` for vanilla).
    """
    device = next(model.parameters()).device
    clock = _TokenClock(device.type == "cuda")
    gen = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        streamer=clock,
        return_dict_in_generate=True,
    )
    with torch.inference_mode(), _PeakMemory(device) as mem, _vision_window(model, clock) as window:
        if sieve is None:
            start = clock.now()
            out = model.generate(**batch, **gen)
        else:
            with sieve(model):
                start = clock.now()
                out = model.generate(**batch, **gen)
    report = sieve.last_report if sieve is not None else None
    tokens = clock.marks[-new_tokens:]  # the first mark is the prompt itself
    ttft = _elapsed(start, tokens[0])
    selection = report.selection_s if report is not None else 0.0
    window_s = _elapsed(window["start"], window["stop"]) if "stop" in window else 0.0
    inside = report is not None and report.stage in (PRE_PROJECTOR, IN_ENCODER)
    vision = max(0.0, window_s - (selection if inside else 0.0))
    decode = _elapsed(tokens[0], tokens[-1]) / (new_tokens - 1) * 1e3 if new_tokens > 1 else None
    timing = CallTiming(
        ttft_s=ttft,
        vision_s=vision,
        selection_s=selection,
        prefill_s=max(0.0, ttft - vision - selection),
        decode_ms_per_token=decode,
        new_tokens=new_tokens,
        peak_memory_bytes=mem.peak,
        kv_cache_bytes=cache_bytes(getattr(out, "past_key_values", None)),
        memory_method=mem.method,
    )
    return timing, report


@dataclass
class Spread:
    """Median and range of repeated measurements."""

    median: float
    min: float
    max: float
    n: int
    values: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, values) -> Spread | None:
        vals = [float(v) for v in values if v is not None]
        if not vals:
            return None
        return cls(statistics.median(vals), min(vals), max(vals), len(vals), vals)

    def to_dict(self) -> dict:
        return dict(vars(self))
