import os
import tempfile

# Never let a test reach for the network (timm would retry a download for ~47 s).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Decoded data sets are cached here for the session (not in the user's cache).
os.environ.setdefault("LOSSATTN_CACHE", tempfile.mkdtemp(prefix="lossattn-cache-"))

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def data_root():
    """The real data slices (../shared/data), or None: tests that need them skip."""
    root = os.environ.get("LOSSATTN_DATA")
    return root if root and os.path.isdir(root) else None


# CI sets LOSSATTN_REQUIRE_DATA=1 (.ci/run): there a missing data root fails these tests instead
# of skipping them, so that they can never pass by not running.
REQUIRE_DATA = os.environ.get("LOSSATTN_REQUIRE_DATA") == "1"


@pytest.fixture
def _data_is_required():
    pytest.fail("LOSSATTN_REQUIRE_DATA=1 but LOSSATTN_DATA does not point at the real data "
                "slices (../shared/data)")


if data_root() is None and REQUIRE_DATA:
    needs_data = pytest.mark.usefixtures("_data_is_required")
else:
    needs_data = pytest.mark.skipif(data_root() is None,
                                    reason="LOSSATTN_DATA is not set (real data slices absent)")
