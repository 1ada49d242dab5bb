"""Stock vLLM's greedy outputs on the reference cases: ``python stock_outputs.py MODEL_DIR REF_DIR``.

A separate process so that the test process holds one engine at a time; writes ``REF_DIR/stock.json``.
"""

import json
import sys
from pathlib import Path

from PIL import Image
from vllm import LLM, SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from helpers import ENGINE  # noqa: E402


def main(model_dir: str, ref_dir: str) -> None:
    ref_dir = Path(ref_dir)
    ref = json.loads((ref_dir / "reference.json").read_text())
    llm = LLM(model=model_dir, **ENGINE)
    params = SamplingParams(max_tokens=ref["max_new_tokens"], temperature=0.0)
    out = []
    for case in ref["cases"]:
        image = Image.open(ref_dir / case["image"]).convert("RGB")
        res = llm.generate({"prompt": case["prompt"], "multi_modal_data": {"image": image}}, params, use_tqdm=False)[0]
        out.append({"ids": list(res.prompt_token_ids), "tokens": list(res.outputs[0].token_ids)})
    (ref_dir / "stock.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:3])
