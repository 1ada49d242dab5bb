"""Stock vLLM's greedy outputs on the reference cases: ``python stock_outputs.py MODEL_DIR REF_DIR [FAMILY]``.

A separate process so that the test process holds one engine at a time; writes ``REF_DIR/stock.json``.

``qwen``: stock vLLM cannot build Qwen2.5-VL's HF processor without torchvision (transformers needs it for the
video processor), so in this process only its processing info is handed the plugin's image-only processor, the one
the plugin's front end uses (and told that only images are supported, since that processor has no video half);
vLLM's Qwen2.5-VL model, the rest of its processor logic and its positions stay stock.
"""

import json
import sys
from pathlib import Path

from PIL import Image
from vllm import LLM, SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from helpers import ENGINE  # noqa: E402


def main(model_dir: str, ref_dir: str, family: str = "llava") -> None:
    ref_dir = Path(ref_dir)
    ref = json.loads((ref_dir / "reference.json").read_text())
    if family == "qwen":
        # the plugin's module first: it makes vLLM's qwen2_vl importable without torchvision
        # isort: off
        from tokensieve_vllm.compat import has_torchvision
        from tokensieve_vllm.qwen_vl import TokenSieveQwen2_5_VLProcessingInfo
        from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLProcessingInfo

        # isort: on

        if not has_torchvision():
            info = TokenSieveQwen2_5_VLProcessingInfo
            Qwen2_5_VLProcessingInfo.get_hf_processor = info.get_hf_processor
            Qwen2_5_VLProcessingInfo.get_supported_mm_limits = info.get_supported_mm_limits
    llm = LLM(model=model_dir, **ENGINE)
    params = SamplingParams(max_tokens=ref["max_new_tokens"], temperature=0.0)
    out = []
    for case in ref["cases"]:
        image = Image.open(ref_dir / case["image"]).convert("RGB")
        res = llm.generate({"prompt": case["prompt"], "multi_modal_data": {"image": image}}, params, use_tqdm=False)[0]
        out.append({"ids": list(res.prompt_token_ids), "tokens": list(res.outputs[0].token_ids)})
    (ref_dir / "stock.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:4])
