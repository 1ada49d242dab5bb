"""The torch-only core (selectors, budget, errors, signal capture, encoder stage, FLOPs, Qwen and NeXT selection)
imports without transformers.

The vLLM integration installs tokensieve next to a different transformers version and uses only these parts; a
top-level ``import transformers`` creeping into them would break it there while every other test stays green.
"""

import subprocess
import sys

import pytest

_BLOCK = """
import sys
class _NoTransformers:
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("transformers is blocked in this test")
        return None
sys.meta_path.insert(0, _NoTransformers())
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCK + code], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_torch_only_parts_import_without_transformers():
    res = _run(
        "import tokensieve, tokensieve.methods, tokensieve.budget, tokensieve.errors, tokensieve.engine.capture, "
        "tokensieve.engine.encoder_stage, tokensieve.tools.flops, tokensieve.engine.merge_units, "
        "tokensieve.engine.anyres, tokensieve.engine.select, tokensieve.plan\n"
        "from tokensieve.methods import get_method, method_names\n"
        "assert 'evocut' in method_names() and get_method('divprune').stage == 'post_projector'\n"
        "assert tokensieve.Budget.parse(64).resolve(576) == 64\n"
        "print('ok')"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


@pytest.mark.slow
def test_sieve_is_still_served_from_the_package_root():
    import tokensieve
    from tokensieve.session import Sieve

    assert tokensieve.Sieve is Sieve
    assert "Sieve" in dir(tokensieve)
    # and it is the part that needs transformers: blocked, the lazy import fails loudly instead of half-working
    res = _run("import tokensieve\ntokensieve.Sieve")
    assert res.returncode != 0 and "transformers is blocked" in res.stderr
