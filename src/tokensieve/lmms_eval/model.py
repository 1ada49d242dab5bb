"""``--model tokensieve``: one batched chat wrapper for every model family tokensieve supports.

``--model_args pretrained=DIR,method=evocut,budget=64,scope=image,evocut.start_layer=10``; ``method=none`` runs the
unpruned model through the same code, so a baseline and its pruned rows differ only in the sieve. Chained stages
are written ``method=evocut+fastv,budget=192+128``; method hyper-parameters ``METHOD.NAME=VALUE``.
``pretrained`` is the name of an embedded model (``default``), a model directory or a hub id.

Why not a subclass of lmms-eval's ``llava_hf``: it runs one request at a time, defaults to ``device_map=""``
(refused by transformers 5.23) and turns a failed generation into an empty answer, which silently scores as wrong.
Here requests are batched with left padding (the sieve gives each sample what a call on its own gives), the model
is loaded through the transformers auto classes, and any failure propagates so the run fails.

Cost is written next to accuracy. Per question (``token_counts`` of each logged sample): visual tokens before and
after pruning (after = layer-averaged for in-LLM methods, the budget's own meaning), the prompt length the LM
received, generated tokens, and FLOPs to the first token with and without pruning (``tokensieve.tools.flops``, LLaVA-1.5
layout only). Per run: the same as means in ``results["throughput"]`` (keys ``avg_visual_tokens_per_image`` ...),
summed over all processes of a data-parallel run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.protocol import ChatMessages
from loguru import logger as eval_logger
from tqdm import tqdm

from .settings import EMBEDDED_MODELS, build_sieve, method_params, resolve_pretrained  # noqa: F401 (re-exported)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class SieveCounts(TokenCounts):
    """lmms-eval's per-request token counts plus what the sieve did to this question (logged with each sample).

    ``input_tokens`` is the prompt length the language model received (after pre-LLM pruning), padding excluded.
    """

    images: int = 0
    visual_tokens_in: int = 0
    visual_tokens: float = 0.0
    flops_to_first_token: int | None = None
    flops_to_first_token_unpruned: int | None = None

    def to_dict(self) -> dict:
        return {
            **super().to_dict(),
            "images": self.images,
            "visual_tokens_in": self.visual_tokens_in,
            "visual_tokens": self.visual_tokens,
            "flops_to_first_token": self.flops_to_first_token,
            "flops_to_first_token_unpruned": self.flops_to_first_token_unpruned,
        }


_SUMS = ("questions", "images", "visual_tokens_in", "visual_tokens", "flops", "flops_unpruned", "gen_tokens", "seconds")


class TokensieveChat(lmms):
    """Chat-template wrapper (lmms-eval's message path) running a tokensieve ``Sieve`` on a transformers VLM."""

    is_simple = False

    def __init__(
        self,
        pretrained: str = "default",
        method: str = "none",
        budget=None,
        scope: str = "image",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        device_map: str | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        **kwargs,
    ) -> None:
        super().__init__()
        params = method_params(kwargs)
        self.sieve = build_sieve(str(method), budget, str(scope), params)  # a typo fails before loading anything
        self.method = "none" if self.sieve is None else self.sieve.name
        path = resolve_pretrained(pretrained)

        self.accelerator = accelerator = Accelerator()
        if device_map not in (None, "", "none") and accelerator.num_processes > 1:
            raise ValueError(
                "device_map= splits one model over devices; it cannot be combined with a data-parallel "
                "launch (accelerate launch --num_processes N)"
            )
        self._device = torch.device(device) if device and accelerator.num_processes == 1 else accelerator.device
        if dtype in (None, "", "auto"):
            torch_dtype = torch.float32 if self._device.type == "cpu" else "auto"
        elif str(dtype) in _DTYPES:
            torch_dtype = _DTYPES[str(dtype)]
        else:
            raise ValueError(f"dtype={dtype}: use one of auto, {', '.join(_DTYPES)}")

        from transformers import AutoModelForImageTextToText, AutoProcessor

        load = dict(dtype=torch_dtype, trust_remote_code=bool(trust_remote_code))
        if attn_implementation:
            load["attn_implementation"] = attn_implementation
        if device_map not in (None, "", "none"):
            load["device_map"] = device_map
        self._model = AutoModelForImageTextToText.from_pretrained(path, **load).eval()
        if "device_map" not in load:
            self._model.to(self._device)
        else:
            self._device = self._model.device
        if self.sieve is not None:  # a setting this model cannot run fails now, not at its first batch
            self.sieve.check(self._model)
        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=bool(trust_remote_code))
        self.processor.tokenizer.padding_side = "left"  # batched generation continues every row at the same column
        self._tokenizer = self.processor.tokenizer
        # torchrun-style launches (and accelerate's on CPU) may leave accelerate's own state single-process while
        # torch.distributed runs; the process group is what lmms-eval shards and gathers with
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()
        else:
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        if batch_size in ("auto", None):
            raise ValueError("batch_size=auto is not supported; give a number")
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.pretrained = str(pretrained)
        self._flops_dims = _flops_dims(self._model.config)
        self._stats: dict[str, dict[str, float]] = {}
        eval_logger.info(
            f"tokensieve: {path} ({type(self._model).__name__}) on {self._device}, method {self.method}"
            f"{'' if self.sieve is None else f' at {budget} per {scope}'}, batch {self.batch_size_per_gpu}"
            f", process {self._rank + 1} of {self._world_size}"
        )

    # -- what lmms-eval reads -----------------------------------------------------------------------------------

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def rank(self):
        return self._rank

    @property
    def world_size(self):
        return self._world_size

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "the tokensieve wrapper runs generation tasks (output_type: generate_until); "
            "loglikelihood / multiple_choice tasks are not supported"
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the tokensieve wrapper runs single-round generation tasks only")

    # -- generation ---------------------------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Answers in request order; batches hold requests with equal generation settings, in document order."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            _, _, gen_kwargs, doc_id, task, split = req.args
            key = json.dumps([task, split, gen_kwargs], sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        results: list[GenerationResult | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="tokensieve " + self.method)
        for indices in groups.values():
            indices.sort(key=lambda i: requests[i].args[3])
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                for i, result in zip(chunk, self._generate_batch([requests[i] for i in chunk])):
                    results[i] = result
                bar.update(len(chunk))
        bar.close()
        return results

    def _generate_batch(self, reqs: list[Instance]) -> list[GenerationResult]:
        texts, images = [], []
        for req in reqs:
            _, doc_to_messages, _, doc_id, task, split = req.args
            chat = ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id]))
            visuals, videos, audios = chat.extract_media()
            if videos or audios:
                raise NotImplementedError(
                    f"{task}: the tokensieve wrapper takes images; this request has "
                    f"{len(videos)} video(s) and {len(audios)} audio clip(s)"
                )
            texts.append(self._prompt(chat.to_hf_messages(), len(visuals)))
            images.append([_rgb(v) for v in visuals])
        gen_kwargs = dict(reqs[0].args[2])
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        generate_kwargs = _generate_kwargs(gen_kwargs)

        has_images = any(images)
        if has_images and not all(images):
            raise NotImplementedError("a batch mixing questions with and without images; use batch_size=1")
        inputs = self.processor(images=images if has_images else None, text=texts, return_tensors="pt", padding=True)
        inputs = inputs.to(self._device)
        for key, value in inputs.items():  # pixel values follow the model's dtype; ids and masks stay integers
            if torch.is_floating_point(value):
                inputs[key] = value.to(self._model.dtype)
        prompt_len = inputs["input_ids"].shape[1]
        start = time.perf_counter()
        with torch.inference_mode():
            if self.sieve is None:
                out = self._model.generate(**inputs, **generate_kwargs)
                report = None
            else:
                with self.sieve(self._model):
                    out = self._model.generate(**inputs, **generate_kwargs)
                report = self.sieve.last_report
        seconds = time.perf_counter() - start
        new = out[:, prompt_len:]
        answers = self.processor.batch_decode(new, skip_special_tokens=True)
        counts = self._counts(inputs, report, new, [len(i) for i in images])
        results = []
        for req, answer, count in zip(reqs, answers, counts):
            for stop in until:  # stop strings cut the answer as lmms-eval's own wrappers do
                if stop:
                    answer = answer.split(stop)[0]
            results.append(GenerationResult(text=answer, token_counts=count))
            if not (req.metadata or {}).get("__padding_only__"):  # rank padding is not part of the results
                self._record(req.args[4], count, seconds / len(reqs))
        return results

    def _prompt(self, messages: list[dict], n_images: int) -> str:
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        token = getattr(self.processor, "image_token", "<image>")
        text = " ".join(c["text"] for m in messages for c in m["content"] if c["type"] == "text")
        return f"{token * n_images}\n{text}" if n_images else text

    # -- cost accounting ----------------------------------------------------------------------------------------

    def _counts(self, inputs, report, new_tokens, n_images: list[int]) -> list[SieveCounts]:
        from ..tools.flops import count_flops, trace_from_report, vanilla_trace

        config = self._model.config
        visual_ids = [getattr(config, k, None) for k in ("image_token_id", "video_token_id")]
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        placeholders = sum((ids == t) for t in visual_ids if t is not None) & mask.bool()
        pad = self._tokenizer.pad_token_id
        eos = self._tokenizer.eos_token_id
        counts = []
        for i in range(ids.shape[0]):
            generated = [t for t in new_tokens[i].tolist() if t not in (pad, eos)]
            visual_in = int(placeholders[i].sum())
            if report is None:
                kept, lm_tokens = float(visual_in), int(mask[i].sum())
            else:
                entries = [im for im in report.images if im.sample == i]
                visual_in = sum(im.tokens_in for im in entries)
                kept = (
                    report.llm_visual_tokens_avg[i]
                    if report.llm_visual_tokens_avg
                    else float(sum(im.tokens_out for im in entries))
                )
                lm_tokens = int(report.llm_layer_tokens[i][0]) if report.llm_layer_tokens else int(mask[i].sum())
            flops = unpruned = None
            if self._flops_dims is not None:
                unpruned = count_flops(
                    self._flops_dims, vanilla_trace(config, ids[i : i + 1], mask[i : i + 1])
                ).to_first_token
                flops = (
                    unpruned
                    if report is None
                    else count_flops(self._flops_dims, trace_from_report(report, sample=i)).to_first_token
                )
            counts.append(
                SieveCounts(
                    input_tokens=lm_tokens,
                    output_tokens=len(generated),
                    images=n_images[i],
                    visual_tokens_in=visual_in,
                    visual_tokens=float(kept),
                    flops_to_first_token=flops,
                    flops_to_first_token_unpruned=unpruned,
                )
            )
        return counts

    def _record(self, task: str, count: SieveCounts, seconds: float) -> None:
        stats = self._stats.setdefault(task, dict.fromkeys(_SUMS, 0.0))
        stats["questions"] += 1
        stats["images"] += count.images
        stats["visual_tokens_in"] += count.visual_tokens_in
        stats["visual_tokens"] += count.visual_tokens
        stats["flops"] += count.flops_to_first_token or 0
        stats["flops_unpruned"] += count.flops_to_first_token_unpruned or 0
        stats["gen_tokens"] += count.output_tokens
        stats["seconds"] += seconds

    def clean(self):
        """Put the run's cost into ``results["throughput"]``, then let lmms-eval free the model.

        lmms-eval calls ``clean()`` once on every process after the last request and before it gathers results,
        which makes it the one safe place for a collective: ``generate_until`` may be skipped on a process whose
        answers all came from ``--use_cache``. The sums of all processes are logged by process 0, whose metric
        history becomes the results file's ``throughput`` section.
        """
        stats = [self._stats]
        dist = torch.distributed
        if self._world_size > 1 and dist.is_available() and dist.is_initialized():
            stats = [None] * dist.get_world_size()
            dist.all_gather_object(stats, self._stats)
        if self._rank == 0:
            metrics = run_metrics(stats, self.method)
            if metrics is not None:
                total = metrics.pop("_totals")
                log_metrics(
                    total_elapsed_time=total["seconds"],
                    total_gen_tokens=int(total["gen_tokens"]),
                    avg_speed=total["gen_tokens"] / total["seconds"] if total["seconds"] else 0.0,
                    additional_metrics=metrics,
                )
        self._stats = {}
        super().clean()


def run_metrics(per_process: list[dict[str, dict[str, float]]], method: str) -> dict | None:
    """Means over the run from every process's per-task sums (``avg_`` is prefixed by lmms-eval's summary)."""
    tasks: dict[str, dict[str, float]] = {}
    for stats in per_process:
        for task, sums in stats.items():
            into = tasks.setdefault(task, dict.fromkeys(_SUMS, 0.0))
            for k in _SUMS:
                into[k] += sums[k]
    if not tasks:
        return None
    total = {k: sum(t[k] for t in tasks.values()) for k in _SUMS}

    def means(s: dict[str, float], prefix: str = "") -> dict[str, float]:
        out = {
            f"{prefix}visual_tokens_per_image": s["visual_tokens"] / s["images"] if s["images"] else 0.0,
            f"{prefix}visual_tokens_in_per_image": s["visual_tokens_in"] / s["images"] if s["images"] else 0.0,
            f"{prefix}seconds_per_question": s["seconds"] / s["questions"],
        }
        if s["flops_unpruned"]:
            out[f"{prefix}flops_to_first_token_per_question"] = s["flops"] / s["questions"]
            out[f"{prefix}flops_to_first_token_ratio"] = s["flops"] / s["flops_unpruned"]
        return out

    metrics = means(total)
    if len(tasks) > 1:
        for task, sums in sorted(tasks.items()):
            metrics.update(means(sums, f"{task}/"))
    metrics["_totals"] = total
    eval_logger.info(
        f"tokensieve {method}: {int(total['questions'])} questions, "
        f"{metrics['visual_tokens_per_image']:.1f} of {metrics['visual_tokens_in_per_image']:.1f} "
        "visual tokens per image"
    )
    return metrics


def _rgb(visual):
    """A PIL image from a task's visual: an image object, or the path of an image file."""
    from PIL import Image

    if isinstance(visual, (str, Path)):
        with Image.open(visual) as im:
            return im.convert("RGB")
    return visual.convert("RGB")


def _generate_kwargs(gen_kwargs: dict) -> dict:
    """transformers ``generate`` arguments from a task's generation_kwargs; greedy unless the task samples."""
    gen = dict(gen_kwargs)
    out = {"max_new_tokens": int(gen.pop("max_new_tokens", 128))}
    temperature = float(gen.pop("temperature", 0) or 0)
    sample = bool(gen.pop("do_sample", False)) or temperature > 0
    top_p = gen.pop("top_p", None)
    beams = int(gen.pop("num_beams", 1) or 1)
    out["do_sample"] = sample
    if sample:
        out["temperature"] = temperature or 1.0
        if top_p is not None:
            out["top_p"] = float(top_p)
    if beams > 1:
        out["num_beams"] = beams
    return out


def _flops_dims(config):
    """The config's FLOPs dimensions, or ``None`` (with a note) for a family ``tokensieve.tools.flops`` cannot price."""
    from ..errors import UnsupportedModelError
    from ..tools.flops import dims_from_config

    try:
        dims = dims_from_config(config)
    except UnsupportedModelError as exc:
        eval_logger.info(f"tokensieve: no FLOPs in the results for this model ({exc})")
        return None
    if dims.family != "llava":
        # per-question vanilla traces need each question's own image sizes / grids out of a batched processor call
        eval_logger.info(f"tokensieve: per-question FLOPs are priced for LLaVA-1.5 only; none for {dims.family}")
        return None
    return dims
