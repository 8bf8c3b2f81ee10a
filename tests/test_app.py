"""The app starts and its home page renders without an exception."""

from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def test_home_renders():
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception
    assert at.title[0].value == "Loss-Attention Studio"
    assert len(at.latex) >= 2
    tables = " ".join(str(t.value) for t in at.table)
    assert "loss_attention" in tables and "resnet18" in tables
