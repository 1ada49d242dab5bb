import pytest

from .conformance import subject


@pytest.fixture(scope="session")
def fam(request):
    """A conformance family's built tiny model (parametrized indirectly by family name), built once per session."""
    return subject(request.param)
