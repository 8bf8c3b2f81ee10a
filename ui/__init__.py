"""The app's shared pieces, in two kinds that a file name tells apart:

- ``figures.py`` and ``overlay.py``: pure builders of plotly figures and PIL images. They never
  import Streamlit, so they are unit- and pixel-tested directly.
- ``st_*.py``: the Streamlit services pages share (remembered choices, cached models and data,
  the error guard, the run-settings form). Only these, the pages and ``app.py`` may import
  Streamlit (``tests/test_layers.py`` checks it).
"""
