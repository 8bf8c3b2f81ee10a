"""Multiple-instance learning: the AAAI 2020 Loss-Attention on bags of feature vectors.

- ``config``: MilConfig, the experiment's settings.
- ``data``: MilDataset; miproblems .mat and CSV loaders; embedded digit bags; the set registry.
- ``models``: the MI-Net embedding and the method table (Loss-Attention, Attention,
  Gated-Attention, mean and TIP-threshold pooling); the loss. Bags are segments of one instance
  matrix, never padded.
- ``protocol``: repeated stratified k-fold CV with validation-based epoch selection.
- ``results``: the result folders (JSON, CSV, Markdown, bag weights).
- ``experiment``: data sets x methods into one results folder; background runs for the app.
- ``paper``: the paper's accuracy table.

Import from the modules themselves: this package imports none of them, so that reading
MilConfig (for the command line's flags) does not load torch.
"""
