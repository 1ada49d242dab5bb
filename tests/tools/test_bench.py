"""`tokensieve bench`, `tokensieve show` and the timing module on the tiny model (no timing is asserted)."""

import json

import pytest
import torch
from PIL import Image

from tokensieve import Sieve
from tokensieve.cli import main
from tokensieve.tools.measure import cache_bytes, measure_call
from tokensieve.tools.show import image_batch, panels_for


def test_measure_call_splits_the_call_and_sizes_the_cache(tiny, single):
    model, _ = tiny
    vanilla, report = measure_call(model, single, None, new_tokens=3)
    assert report is None and vanilla.decode_ms_per_token is not None
    assert 0 < vanilla.vision_s < vanilla.ttft_s
    assert vanilla.prefill_s == pytest.approx(vanilla.ttft_s - vanilla.vision_s - vanilla.selection_s)
    cfg = model.config.text_config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    # the cache holds the prompt and every generated token but the last (it is never fed back)
    assert vanilla.kv_cache_bytes == per_token * (single["input_ids"].shape[1] + 2)
    sieved, report = measure_call(model, single, Sieve("evocut", 16), new_tokens=1)
    assert report.tokens_out == 16 and sieved.decode_ms_per_token is None
    assert sieved.selection_s == report.selection_s > 0
    assert sieved.kv_cache_bytes == per_token * report.seq_len_out
    assert cache_bytes(None) == 0


def test_bench_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(
        [
            "bench",
            "--arch",
            "tiny",
            "--methods",
            "evocut,pool",
            "--budgets",
            "16,0.25",
            "--repeats",
            "2",
            "--warmup",
            "0",
            "--new-tokens",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads((out / "bench.json").read_text())
    rows = {r["config"]: r for r in result["rows"]}
    assert list(rows) == ["none", "evocut@16", "evocut@0.25", "pool@16", "pool@0.25"]
    assert [r["visual_tokens"] for r in rows.values()] == [144, 16, 36, 16, 36]
    for r in rows.values():
        assert r["ttft_s"]["n"] == 2 and len(r["ttft_s"]["values"]) == 2
        assert r["ttft_s"]["min"] <= r["ttft_s"]["median"] <= r["ttft_s"]["max"]
    assert rows["none"]["flops_ideal_ttft_speedup"] == 1.0
    assert rows["evocut@16"]["flops_ideal_ttft_speedup"] > rows["evocut@0.25"]["flops_ideal_ttft_speedup"] > 1
    assert rows["evocut@16"]["kv_cache_bytes"]["median"] < rows["none"]["kv_cache_bytes"]["median"]
    assert result["meta"]["repeats"] == 2 and result["meta"]["threads"] == torch.get_num_threads()
    md = (out / "bench.md").read_text()
    assert "| evocut@16 | 16 |" in md and "FastV Eq.5" in md and "FLOPs-ideal" in md
    with Image.open(out / "bench.png") as png:
        assert png.format == "PNG" and png.size[0] > png.size[1]


def test_bench_on_a_saved_model_directory(tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    assert main(["make-tiny", str(model_dir)]) == 0
    out = tmp_path / "bench"
    assert (
        main(
            [
                "bench",
                "--model",
                str(model_dir),
                "--methods",
                "fastervlm",
                "--budgets",
                "9",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--new-tokens",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [r["visual_tokens"] for r in rows] == [144, 9]
    assert rows[1]["decode_ms_per_token"] is None and rows[1]["ttft_s"]["n"] == 1


def _save_family(name, model_dir):
    """A tiny model of ``name`` saved as a model directory, with its processor where one can be built here."""
    from tests.families import builders as F

    proc = None
    if name == "llava_next":
        model, proc = F.build_tiny_llava_next()
    elif name == "llava_next_video":
        model, _ = F.build_tiny_llava_next_video()
    elif name == "llava_onevision":
        model, _ = F.build_tiny_onevision()
    elif name.startswith("qwen"):
        model, _ = F.build_tiny_qwen(name)
    else:
        model, proc = F.build_tiny_idefics3(smolvlm=name == "smolvlm")
    model.save_pretrained(model_dir)
    if proc is not None:
        proc.save_pretrained(model_dir)
    return model


@pytest.mark.parametrize(
    "name", ["llava_next", "llava_next_video", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm"]
)
def test_bench_runs_on_every_family(name, tmp_path, capsys):
    """``bench --model DIR`` times and prices every family; where the processor needs torchvision (video processors)
    it falls back to synthetic inputs of the family's layout and says so. FLOPs come from each call's trace."""
    from tokensieve.tools.flops import count_flops, vanilla_trace

    model = _save_family(name, tmp_path / "model")
    out = tmp_path / "bench"
    assert (
        main(
            [
                "bench",
                "--model",
                str(tmp_path / "model"),
                "--methods",
                "random,evoprune",
                "--budgets",
                "0.5",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--new-tokens",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()  # results on stdout, notes on stderr
    text = " ".join((captured.out + captured.err).split())
    assert ("cannot be loaded here" in text) == (name not in ("llava_next", "idefics3", "smolvlm"))
    rows = {r["config"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}
    assert list(rows) == ["none", "random@0.5", "evoprune@0.5"]
    none, rnd, evo = (rows[k]["flops"] for k in rows)
    assert rnd["prefill"] < none["prefill"] and evo["vision"] < none["vision"] == rnd["vision"]
    assert rows["random@0.5"]["visual_tokens"] < rows["none"]["visual_tokens"]
    assert all(r["ttft_s"]["n"] == 1 for r in rows.values())
    if name in ("qwen2_vl", "llava_onevision"):  # the vanilla row is the synthetic batch's exact trace
        from tokensieve.models.archs import synthetic_inputs

        flops = count_flops(model.config, vanilla_trace(model.config, **synthetic_inputs(model.config), new_tokens=2))
        assert none["total"] == flops.total
        assert (
            main(
                [
                    "bench",
                    "--model",
                    str(tmp_path / "model"),
                    "--methods",
                    "random",
                    "--budgets",
                    "0.5",
                    "--new-tokens",
                    "2",
                    "--flops-only",
                    "--out",
                    str(tmp_path / "f"),
                ]
            )
            == 0
        )
        only = json.loads((tmp_path / "f" / "bench.json").read_text())["rows"]
        assert only[0]["flops"]["total"] == flops.total and "measured call" in only[1]["note"]


def test_bench_on_a_model_too_big_here_writes_the_flops_table_only(tmp_path, capsys):
    out = tmp_path / "b7"
    assert (
        main(
            [
                "bench",
                "--arch",
                "llava15-7b",
                "--methods",
                "evocut,divprune",
                "--budgets",
                "64",
                "--flops-only",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "FLOPs only" in " ".join(capsys.readouterr().out.split())
    result = json.loads((out / "bench.json").read_text())
    rows = {r["config"]: r for r in result["rows"]}
    assert rows["none"]["visual_tokens"] == 576 and rows["evocut@64"]["visual_tokens"] == 64
    # divprune selects after the projector, so it projects all 576 tokens
    assert rows["divprune@64"]["flops"]["projector"] == rows["none"]["flops"]["projector"]
    assert rows["evocut@64"]["flops"]["projector"] * 9 == rows["none"]["flops"]["projector"]
    assert "ttft_s" not in rows["none"] and (out / "bench.png").exists()


def test_show_panels_hold_the_kept_and_merged_patches(tiny, images):
    model, processor = tiny
    batch = image_batch(model, images[0], processor.image_processor)
    evocut, pool, vz = panels_for(model, batch, ["evocut", "pool", "visionzip"], 16)
    assert len(evocut.kept) == 16 and evocut.groups is None and evocut.merged_cells == {}
    # pool: 8x8 grid -> 4x4 windows of 2x2 patches, every patch in exactly one group
    assert pool.grid == (8, 8) and pool.kept == []
    assert sorted(len(c) for c in pool.merged_cells.values()) == [4] * 16
    assert sorted(set(pool.groups)) == list(range(16))
    # visionzip at 16: CLS + 13 dominant patches + 2 contextual tokens merging every other patch
    assert len(vz.kept) == 13 and len(vz.merged_cells) == 2
    merged = [c for cells in vz.merged_cells.values() for c in cells]
    assert sorted(merged + vz.kept) == list(range(64))


def test_show_draws_evoprune_merges_inside_the_encoder(tiny, images):
    """EvoPrune merges every dropped patch into a kept one: the panel must show those groups, not only kept cells."""
    model, processor = tiny
    batch = image_batch(model, images[0], processor.image_processor)
    (ep,) = panels_for(model, batch, ["evoprune"], 16)
    assert ep.groups is not None and len(set(ep.groups)) == 16 and min(ep.groups) >= 0
    merged = [c for cells in ep.merged_cells.values() for c in cells]
    assert merged and sorted(merged + ep.kept) == list(range(64))
    assert f"{len(ep.merged_cells)} merged" in ep.title


def test_show_writes_one_panel_per_method(tmp_path, capsys):
    out = tmp_path / "show.png"
    assert main(["show", "--method", "evocut,pool", "--budget", "36", "--out", str(out)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "evocut @ 36: 36 of 144 tokens: 36 kept patches, 0 merge groups" in text
    assert "pool @ 36: 36 of 144 tokens, 36 merged: 0 kept patches, 36 merge groups" in text
    one = tmp_path / "one.png"
    assert main(["show", "--method", "pool", "--budget", "36", "--out", str(one)]) == 0
    with Image.open(out) as two_panels, Image.open(one) as one_panel:
        assert two_panels.size[0] == pytest.approx(2 * one_panel.size[0], rel=0.02)
