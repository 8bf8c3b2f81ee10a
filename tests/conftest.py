import os
import tempfile

# Never let a test reach for the network (timm would retry a download for ~47 s).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Decoded data sets are cached here for the session (not in the user's cache).
os.environ.setdefault("LOSSATTN_CACHE", tempfile.mkdtemp(prefix="lossattn-cache-"))

import pytest
import torch

# One torch thread for this process and for every job a test starts (issue 34). OpenMP threads
# that wait on each other at every barrier collapse when the cores are busy with other work
# (a first `make test` on a loaded 2-core machine took 37 min instead of about 5); one thread
# each only slows down. Bit-for-bit comparisons between a test's own training and its jobs'
# need the same count anyway. Tests of the thread budget itself unset it.
os.environ.setdefault("LOSSATTN_THREADS", "1")
torch.set_num_threads(int(os.environ["LOSSATTN_THREADS"]))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _unconfined():
    """Each test starts with data reads unconfined, and a confinement that an app script set
    (app.py does, as the server does at start) ends with the test. Not through monkeypatch:
    a test's ``monkeypatch.undo()`` would bring back a confinement set outside any test (by a
    module-scoped app), and teardown must not restore one either."""
    os.environ.pop("LOSSATTN_CONFINED_TO", None)
    data = os.environ.get("LOSSATTN_DATA")  # the confinement makes it absolute
    yield
    os.environ.pop("LOSSATTN_CONFINED_TO", None)
    if data is None:
        os.environ.pop("LOSSATTN_DATA", None)
    else:
        os.environ["LOSSATTN_DATA"] = data


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


def open_page(page: str | None = None, **state):
    """The app under AppTest, on ``page`` (a file of pages/), with ``state`` in its session;
    fails the test if anything raised."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    app = str(Path(__file__).resolve().parents[1] / "app.py")
    at = AppTest.from_file(app, default_timeout=300)
    for key, value in state.items():
        at.session_state[key] = value
    at.run()
    if page:
        at.switch_page(f"pages/{page}.py").run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def errors(at) -> list[str]:
    """The error messages on the page."""
    return [e.value for e in at.error]


# ----------------------------------------------------------------------------------------------
# The real-browser tests (test_browser, test_fit_explorer, test_fit_pages)

PROJECTOR = {"width": 1366, "height": 768}
"""A classroom projector's screen: the size the pages must fit (issue 31)."""


def browser_or_skip():
    """Playwright's ``sync_playwright``. Where the browser is optional (a developer's machine
    without it) a missing driver skips the calling test module; CI sets
    ``LOSSATTN_REQUIRE_BROWSER=1``, and there the import fails instead."""
    if not os.environ.get("LOSSATTN_REQUIRE_BROWSER"):
        pytest.importorskip("playwright.sync_api")
    from playwright.sync_api import sync_playwright

    return sync_playwright


def needs_chromium(chromium: str):
    """The module mark: skip, naming the install, where chromium is missing and not required."""
    from pathlib import Path

    return pytest.mark.skipif(
        not Path(chromium).exists() and not os.environ.get("LOSSATTN_REQUIRE_BROWSER"),
        reason="chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="session")
def artifacts():
    """Where the browser tests keep their screenshots: ``test-artifacts/browser/`` (or
    ``$LOSSATTN_ARTIFACTS/browser``)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    folder = Path(os.environ.get("LOSSATTN_ARTIFACTS", root / "test-artifacts")) / "browser"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def kill_mid_epoch(run, monkeypatch, at: tuple[int, int] = (1, 2)) -> None:
    """Train ``run`` until its checkpoint at (epoch, step) ``at`` is written, then end it as a
    kill would (the run's config must checkpoint every step: ``checkpoint_minutes`` tiny); its
    status then says ``failed``, as status() reports a run whose process is gone."""
    import pytest

    from engine import train

    real_save = train.atomic_torch_save

    def save(obj, path):
        real_save(obj, path)
        if path.name == "last.pt" and (obj["progress"]["epoch"], obj["progress"]["step"]) == at:
            raise KeyboardInterrupt  # as a kill would, mid-epoch

    monkeypatch.setattr(train, "atomic_torch_save", save)
    with pytest.raises(KeyboardInterrupt):
        train.train_run(run, progress_bar=False)
    monkeypatch.setattr(train, "atomic_torch_save", real_save)
    run.update_status(state="failed")
