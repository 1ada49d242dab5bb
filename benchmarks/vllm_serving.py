"""Serving throughput with vLLM: stock LLaVA vs tokensieve methods, N concurrent chat requests against the server.

Two steps, in the two environments (vLLM's CPU build and core tokensieve need different transformers versions):

    # core environment: the `llava15-cpu` architecture with random weights, saved for vLLM
    python benchmarks/vllm_serving.py prepare --out /tmp/llava15-cpu
    # vLLM environment (see README, "Serving with vLLM"): stock server, then the plugin server, one after the other
    flock /work/wt/timing.lock python benchmarks/vllm_serving.py run --model /tmp/llava15-cpu

``run`` starts the OpenAI server on 127.0.0.1 twice: stock (`LlavaForConditionalGeneration`), then the plugin
(``hf_overrides`` architecture, ``--trust-request-mm-kwargs``), where every method x budget is a per-request
setting. Each configuration sends ``--requests`` chat completions at once (streaming, ``--max-tokens`` tokens each,
EOS ignored), every request with its own random image (no cache of any kind can serve one request from another;
prefix caching is off as well), after one warm-up request. Reported: requests/s and output tokens/s over the
wall-clock of the batch, TTFT p50/p95 (first streamed token), KV-cache tokens per request and the server's peak
KV-cache usage, and beside the measured speed-up the FLOPs-ideal one (tokensieve.tools.flops: vision encoder, projector,
prefill and decoding of one request, as vLLM runs them). Results: benchmarks/results/vllm_serving.{json,md}.

Timing depends on machine load: run under ``flock /work/wt/timing.lock`` and read the load recorded in the results.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PLUGIN_ARCH = "TokenSieveLlavaForConditionalGeneration"
IMAGE_TOKEN = 4  # the word-level tokenizer's "<image>"; set as the config's image_token_id by `prepare`


# -- prepare (core environment) --------------------------------------------------------------------------------
def prepare(out: Path, seed: int) -> None:
    """`llava15-cpu` with seeded random weights, a word-level tokenizer over the LM's full vocabulary, and a
    LLaVA processor, saved where vLLM can load it (CLIP weights under `vision_tower.vision_model.`, as stock vLLM
    expects; the plugin accepts both namings)."""
    import torch
    from safetensors.torch import save_file

    from tokensieve.models.archs import build_arch
    from tokensieve.models.tiny import SPECIALS, build_processor, build_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    model = build_arch("llava15-cpu", seed=seed)
    cfg = model.config
    vocab = cfg.get_text_config().vocab_size
    tokenizer = build_tokenizer([f"w{i}" for i in range(vocab - len(SPECIALS))])
    assert len(tokenizer) == vocab and tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN
    cfg.image_token_id = IMAGE_TOKEN  # the placeholder id of this tokenizer (the weights are random anyway)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    processor = build_processor(tokenizer, cfg.vision_config.image_size, cfg.vision_config.patch_size)
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.get_text_config().tie_word_embeddings:
            continue
        if name.startswith("model.vision_tower.") and not name.startswith("model.vision_tower.vision_model."):
            name = "model.vision_tower.vision_model." + name[len("model.vision_tower.") :]
        state[name] = tensor.detach().to(torch.float32).contiguous()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    cfg.save_pretrained(out)
    processor.save_pretrained(out)
    print(f"saved llava15-cpu ({sum(t.numel() for t in state.values()) / 1e9:.2f} B parameters) to {out}")


# -- run (vLLM environment) ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One OpenAI server process on 127.0.0.1, started and stopped by its process id."""

    def __init__(
        self, model: Path, plugin: bool, log: Path, max_model_len: int, max_num_seqs: int, trace: Path | None = None
    ) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--served-model-name",
            "bench",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--max-model-len",
            str(max_model_len),
            "--max-num-seqs",
            str(max_num_seqs),
            "--dtype",
            "float32",
            "--enforce-eager",
            "--no-enable-prefix-caching",
            "--seed",
            "0",
        ]
        if plugin:
            cmd += ["--hf-overrides", json.dumps({"architectures": [PLUGIN_ARCH]}), "--trust-request-mm-kwargs"]
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        if trace is not None:  # the plugin's per-image record: encoder lengths for the FLOPs of in-encoder methods
            env["TOKENSIEVE_VLLM_TRACE"] = str(trace)
        self.log = log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait(self, timeout: float = 1800) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); see {self.log}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(2)
        raise RuntimeError(f"server not up after {timeout} s; see {self.log}")

    def kv_usage(self) -> float | None:
        """The server's current KV-cache usage (0..1) from its Prometheus metrics."""
        try:
            with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("vllm:kv_cache_usage_perc"):
                        return float(line.rsplit(" ", 1)[1])
        except OSError:
            return None
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=60)


def _image_b64(size: int, seed: int) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _body(image: str, text: str, max_tokens: int, settings: dict | None) -> dict:
    body = {
        "model": "bench",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}},
                    {"type": "text", "text": text},
                ],
            }
        ],
    }
    if settings is not None:
        body["mm_processor_kwargs"] = {f"tokensieve_{k}": v for k, v in settings.items()}
    return body


async def _one(session, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    ttft = None
    usage = None
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if ttft is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - t0
    return {"ttft": ttft, "latency": time.perf_counter() - t0, "usage": usage}


async def _batch(server: Server, bodies: list[dict]) -> tuple[float, list[dict], float | None]:
    import aiohttp

    peak: list[float] = []
    done = asyncio.Event()

    async def watch():
        while not done.is_set():
            u = await asyncio.to_thread(server.kv_usage)
            if u is not None:
                peak.append(u)
            await asyncio.sleep(0.5)

    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        watcher = asyncio.create_task(watch())
        t0 = time.perf_counter()
        results = await asyncio.gather(*[_one(session, server.url, b) for b in bodies])
        wall = time.perf_counter() - t0
        done.set()
        await watcher
    return wall, results, max(peak) if peak else None


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def _kv_bytes_per_token(config) -> int:
    tc = config.get_text_config()
    heads = tc.num_attention_heads
    kv = getattr(tc, "num_key_value_heads", None) or heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    return 2 * tc.num_hidden_layers * kv * head_dim * 4  # K and V, fp32


def _flops(config, text: int, k: int, new_tokens: int, projected: int, encoder_layer_tokens: list[int]) -> int:
    """FLOPs of one request as vLLM ran it: the encoder layers it ran (lengths from the plugin's trace, or the stock
    tower up to the feature layer), the projector on ``projected`` tokens, prefill of text + k, then decoding."""
    from tokensieve.tools.flops import analytic_trace, count_flops, dims_from_config

    trace = analytic_trace(config, text_tokens=text, visual_tokens=k, projected_tokens=projected, new_tokens=new_tokens)
    trace.encoder_layer_tokens = list(encoder_layer_tokens)
    return count_flops(dims_from_config(config), trace).total


def _stock_encoder(config) -> list[int]:
    """vLLM builds and runs the CLIP tower only up to the feature layer."""
    vc = config.vision_config
    depth = (
        vc.num_hidden_layers + 1 + config.vision_feature_layer
        if config.vision_feature_layer < 0
        else config.vision_feature_layer
    )
    n = (vc.image_size // vc.patch_size) ** 2 + 1
    return [n if i < depth else 0 for i in range(vc.num_hidden_layers)]


def _trace_lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def run(args) -> None:
    from transformers import AutoConfig

    from tokensieve.methods import get_method

    model = Path(args.model)
    config = AutoConfig.from_pretrained(model)
    side = config.vision_config.image_size // config.vision_config.patch_size
    n_tok = side * side
    words = " ".join(f"w{100 + i}" for i in range(args.text_words))
    configs = [("stock", None)] + [(m, b) for m in args.methods for b in args.budgets]
    RESULTS.mkdir(parents=True, exist_ok=True)
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    rows = []
    load_before = os.getloadavg()
    seed = 0
    for plugin in (False, True):
        todo = [c for c in configs if (c[0] != "stock") == plugin]
        trace = logs / "trace.jsonl"
        trace.unlink(missing_ok=True)
        server = Server(
            model,
            plugin,
            logs / f"server_{'plugin' if plugin else 'stock'}.log",
            args.max_model_len,
            args.requests,
            trace=trace if plugin else None,
        )
        try:
            t0 = time.perf_counter()
            server.wait()
            print(f"{'plugin' if plugin else 'stock'} server up in {time.perf_counter() - t0:.0f} s", flush=True)
            for method, budget in todo:
                settings = None if method == "stock" else {"method": method, "budget": budget}
                seed += 1
                asyncio.run(
                    _batch(
                        server,
                        [
                            _body(
                                _image_b64(config.vision_config.image_size, 10_000 + seed),
                                words,
                                args.max_tokens,
                                settings,
                            )
                        ],
                    )
                )  # warm-up, its own image
                bodies = []
                for _ in range(args.requests):
                    seed += 1
                    bodies.append(
                        _body(_image_b64(config.vision_config.image_size, seed), words, args.max_tokens, settings)
                    )
                load = os.getloadavg()[0]
                seen = len(_trace_lines(trace))
                wall, results, kv_peak = asyncio.run(_batch(server, bodies))
                lines = _trace_lines(trace)[seen:]
                if plugin and len(lines) != args.requests:
                    raise RuntimeError(f"expected {args.requests} trace lines for {method}@{budget}, got {len(lines)}")
                encoder = (
                    [statistics.mean(col) for col in zip(*[t["encoder_layer_tokens"] for t in lines])]
                    if plugin
                    else _stock_encoder(config)
                )
                prompt = [r["usage"]["prompt_tokens"] for r in results]
                out_tok = [r["usage"]["completion_tokens"] for r in results]
                k = n_tok if budget is None else budget
                text = prompt[0] - k
                stage = "stock" if method == "stock" else get_method(method).stage
                rows.append(
                    {
                        "config": method if budget is None else f"{method}@{budget}",
                        "method": method,
                        "tokens_per_image": k,
                        "requests": args.requests,
                        "wall_s": wall,
                        "requests_per_s": args.requests / wall,
                        "output_tokens_per_s": sum(out_tok) / wall,
                        "ttft_p50_s": _pct([r["ttft"] for r in results], 0.5),
                        "ttft_p95_s": _pct([r["ttft"] for r in results], 0.95),
                        "prompt_tokens": statistics.mean(prompt),
                        "output_tokens": statistics.mean(out_tok),
                        "kv_tokens_per_request": statistics.mean(p + o for p, o in zip(prompt, out_tok)),
                        "kv_mib_per_request": statistics.mean(p + o for p, o in zip(prompt, out_tok))
                        * _kv_bytes_per_token(config)
                        / 2**20,
                        "kv_cache_peak_usage": kv_peak,
                        "flops_per_request": _flops(
                            config, text, k, args.max_tokens, n_tok if stage == "post_projector" else k, encoder
                        ),
                        "stage": stage,
                        "encoder_layer_tokens": encoder,
                        "load_1min_at_start": load,
                    }
                )
                print(
                    json.dumps({kk: (round(v, 3) if isinstance(v, float) else v) for kk, v in rows[-1].items()}),
                    flush=True,
                )
        finally:
            server.stop()
    base = rows[0]
    for r in rows:
        r["speedup_requests_per_s"] = r["requests_per_s"] / base["requests_per_s"]
        r["flops_ideal_speedup"] = base["flops_per_request"] / r["flops_per_request"]
    meta = {
        "model": "llava15-cpu (random weights), fp32",
        "vllm": _version("vllm-cpu"),
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "text_words": args.text_words,
        "cpus": os.cpu_count(),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "command": "python benchmarks/vllm_serving.py run " + " ".join(sys.argv[2:]),
    }
    (RESULTS / "vllm_serving.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"# vLLM serving: stock vs tokensieve ({meta['model']}, {args.requests} concurrent requests, "
        f"{args.max_tokens} output tokens each)",
        "",
        f"Command: `{meta['command']}`. Machine: {meta['cpus']} CPUs shared with other jobs; 1-min load average "
        f"{load_before[0]:.1f} before, {meta['load_avg_after'][0]:.1f} after (per row below at its start).",
        "",
        "| config | tokens/image | requests/s | speed-up | FLOPs-ideal | output tok/s | TTFT p50 (s) | TTFT p95 (s) "
        "| KV tokens/request | KV MiB/request | peak KV use | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peak = "n/a" if r["kv_cache_peak_usage"] is None else f"{100 * r['kv_cache_peak_usage']:.1f}%"
        lines.append(
            f"| {r['config']} | {r['tokens_per_image']} | {r['requests_per_s']:.3f} "
            f"| {r['speedup_requests_per_s']:.2f}x "
            f"| {r['flops_ideal_speedup']:.2f}x | {r['output_tokens_per_s']:.2f} | {r['ttft_p50_s']:.1f} "
            f"| {r['ttft_p95_s']:.1f} | {r['kv_tokens_per_request']:.0f} | {r['kv_mib_per_request']:.1f} | {peak} "
            f"| {r['load_1min_at_start']:.1f} |"
        )
    (RESULTS / "vllm_serving.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="save llava15-cpu with random weights (core environment)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run", help="stock vs methods against the OpenAI server (vLLM environment)")
    r.add_argument("--model", required=True)
    r.add_argument("--methods", nargs="+", default=["fastervlm", "divprune", "evoprune"])
    r.add_argument("--budgets", nargs="+", type=int, default=[64, 128, 192])
    r.add_argument("--requests", type=int, default=6, help="concurrent requests per configuration")
    r.add_argument("--max-tokens", type=int, default=16)
    r.add_argument("--text-words", type=int, default=32)
    r.add_argument("--max-model-len", type=int, default=1024)
    r.add_argument("--logs", default="/tmp/tokensieve_vllm_serving")
    args = parser.parse_args()
    if args.cmd == "prepare":
        prepare(Path(args.out), args.seed)
    else:
        run(args)


if __name__ == "__main__":
    main()
