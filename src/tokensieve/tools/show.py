"""``tokensieve show``: which patches a method keeps (and which it merges into what), drawn on the image.

The picture is the square the model actually sees (the processor's resize + centre crop, taken from the original
image so it stays sharp), with the patch grid from the report: kept patches shown as they are, dropped patches
dimmed, and each merge group tinted with its own colour. The data drawn is returned too, so it can be checked
without reading pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image


@dataclass
class Panel:
    title: str
    grid: tuple[int, int]
    kept: list[int]
    """Grid patches (raster) kept as themselves (not merged with others)."""
    groups: list[int] | None
    """Per grid patch, the output token it went into (-1 dropped), for merging methods; else ``None``."""
    tokens_out: int

    @property
    def merged_cells(self) -> dict[int, list[int]]:
        """Created-token slot -> the patches merged into it (patches kept as themselves excluded)."""
        if self.groups is None:
            return {}
        kept = set(self.kept)
        out: dict[int, list[int]] = {}
        for cell, slot in enumerate(self.groups):
            if slot >= 0 and cell not in kept:
                out.setdefault(slot, []).append(cell)
        return out


def model_view(image: Image.Image, size: int = 384) -> Image.Image:
    """The centre square a CLIP-style processor crops after resizing the short side, at ``size`` pixels."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.convert("RGB").crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


def image_batch(model, image: Image.Image, image_processor=None) -> dict[str, torch.Tensor]:
    """Pixels from the model's own image processor (a CLIP one sized from the config when there is none), inside a
    prompt of the model's full placeholder run."""
    from ..models.archs import synthetic_inputs

    if image_processor is None:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        size = model.config.vision_config.image_size
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    batch = synthetic_inputs(model, text_tokens=8)
    pixels = image_processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"]
    batch["pixel_values"] = pixels.to(batch["pixel_values"].dtype).to(batch["pixel_values"].device)
    return batch


def panels_for(
    model, batch: dict, configs: list, budget=None, *, params: dict | None = None, scope: str = "image"
) -> list[Panel]:
    """Run each configuration once (one greedy token) and collect what its report says about the first image.

    ``configs`` are :class:`~tokensieve.tools.configs.Config` objects, or method names that all take ``budget``. An
    in-LLM stage drops tokens inside the LM, after what is drawn: the panel shows the tokens entering the LM.
    """
    from .configs import Config, format_budget

    panels = []
    for config in configs:
        if isinstance(config, str):
            config = Config.single(config, budget)
        sieve = config.sieve(params, scope)
        name = f"{config.method} @ {format_budget(config.budgets)}"
        with torch.inference_mode(), sieve(model):
            model.generate(**batch, max_new_tokens=1, do_sample=False)
        im = sieve.last_report.images[0]
        merged = f", {im.merged} merged" if im.merged else ""
        kept = list(im.kept_indices)
        if im.groups is not None:
            # a representative position of a merged token (pool's window centre) is not a patch kept as itself
            sizes: dict[int, int] = {}
            for slot in im.groups:
                sizes[slot] = sizes.get(slot, 0) + 1
            kept = [c for c in kept if sizes.get(im.groups[c], 0) == 1]
        if sieve.llm_method is not None:
            merged += ", in-LLM stage not drawn"
        panels.append(
            Panel(
                f"{name}: {im.tokens_out} of {im.tokens_in} tokens{merged}",
                tuple(im.grid),
                kept,
                im.groups,
                im.tokens_out,
            )
        )
    return panels


def render(view: Image.Image, panels: list[Panel], out: str | Path, suptitle: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    base = np.asarray(view, dtype=np.float32) / 255.0
    size = base.shape[0]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax, panel in zip(axes[0], panels):
        rows, cols = panel.grid
        ch, cw = size / rows, size / cols
        shade = np.full((rows, cols), 0.25, dtype=np.float32)  # dropped patches: a quarter of their brightness
        for cell in panel.kept:
            shade[cell // cols, cell % cols] = 1.0
        merged = panel.merged_cells
        for cells in merged.values():
            for cell in cells:
                shade[cell // cols, cell % cols] = 0.7
        mask = np.kron(shade, np.ones((int(np.ceil(ch)), int(np.ceil(cw))), dtype=np.float32))[:size, :size]
        ax.imshow(base * mask[..., None])
        for i, (_slot, cells) in enumerate(sorted(merged.items())):
            colour = cmap(i % 20)
            for cell in cells:
                r, c = divmod(cell, cols)
                ax.add_patch(Rectangle((c * cw, r * ch), cw, ch, facecolor=colour, alpha=0.35, linewidth=0))
        for cell in panel.kept:
            r, c = divmod(cell, cols)
            ax.add_patch(Rectangle((c * cw, r * ch), cw, ch, fill=False, edgecolor="white", linewidth=0.6))
        ax.set_title(panel.title, fontsize=9)
        ax.set_axis_off()
    if suptitle:
        fig.suptitle(suptitle, fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
