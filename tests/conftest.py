"""Every test run gets its own prepare cache: nothing is read from or left in ~/.cache."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_prepare_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MMPREP_CACHE", str(tmp_path_factory.mktemp("mmprep-cache")))
    yield
    mp.undo()
