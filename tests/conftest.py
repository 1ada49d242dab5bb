import pytest
import torch

from tokensieve.models.tiny import build_tiny_llava, demo_image

torch.set_num_threads(2)

# 32 px images, 4 px patches: an 8x8 grid of 64 visual tokens per image; 6 CLIP layers, feature layer -2
TINY = dict(image_size=32, patch_size=4, vision_layers=6, text_layers=2)
N_TOKENS = 64


@pytest.fixture(scope="session")
def tiny():
    model, processor = build_tiny_llava(**TINY)
    return model, processor


@pytest.fixture(scope="session")
def tiny_eager():
    model, processor = build_tiny_llava(**TINY, attn_implementation="eager")
    return model, processor


@pytest.fixture(scope="session")
def images():
    return [demo_image(size=96, seed=s) for s in range(3)]


def prompt(processor, question, n_images=1):
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


@pytest.fixture(scope="session")
def single(tiny, images):
    _, processor = tiny
    return processor(images=[images[0]], text=[prompt(processor, "what is in the picture ?")], return_tensors="pt")


def batch_and_singles(model, sieve, batch, singles):
    """Logits and reports of one sieved batch call and of each sample's own call, for batch == singles tests."""
    with sieve(model), torch.inference_mode():
        batch_logits = model(**batch).logits
        batch_report = sieve.last_report
        single_logits, single_reports = [], []
        for s in singles:
            single_logits.append(model(**s).logits)
            single_reports.append(sieve.last_report)
    return batch_logits, batch_report, single_logits, single_reports
