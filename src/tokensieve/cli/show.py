"""``tokensieve show``: kept patches and merge groups drawn on the image (the work is
:mod:`tokensieve.tools.show`'s). Arguments are checked before anything heavy is imported."""

from __future__ import annotations

from ..tools.configs import group_params, parse_configs
from ..tools.inputs import check_out_file, load_image
from .console import Out, load_with_note


def cmd_show(args, out: Out) -> int:
    configs = parse_configs(args.methods, args.budgets)
    params = group_params(args.param, configs)
    for config in configs:
        config.sieve(params, args.scope)
    image = load_image(args.image) if args.image else None
    check_out_file(args.out)

    from ..models.tiny import demo_image
    from ..tools.show import image_batch, model_view, panels_for, render

    image = image or demo_image()
    if args.arch:
        from ..models.archs import build_arch

        model, image_processor = build_arch(args.arch), None
        name = args.arch
    else:
        model, processor = load_with_note(args.model, out)
        image_processor = getattr(processor, "image_processor", None)
        name = args.model or "default model"
    batch = image_batch(model, image, image_processor)
    panels = panels_for(model, batch, configs, params=params, scope=args.scope)
    path = render(
        model_view(image), panels, args.out, suptitle=f"{name}: bright = kept, tinted = merged, dim = dropped"
    )
    for p in panels:
        out.console.print(f"{p.title}: {len(p.kept)} kept patches, {len(p.merged_cells)} merge groups", highlight=False)
    out.note(f"wrote {path}")
    return 0
