"""Multiple-instance learning: the AAAI 2020 Loss-Attention on bags of feature vectors.

- ``data``: MilDataset; miproblems .mat and CSV loaders; embedded digit bags; the set registry.
- ``models``: the MI-Net embedding with Loss-Attention, Attention, Gated-Attention, mean and
  TIP-threshold pooling; the loss. Bags are segments of one instance matrix, never padded.
- ``protocol``: repeated stratified k-fold CV with validation-based epoch selection; result files.
- ``experiment``: data sets x methods into one results folder; background runs for the app.
- ``paper``: the paper's accuracy table.
"""

from engine.mil.data import MilDataError, MilDataset, list_mil_datasets, load_mil_dataset
from engine.mil.models import MIL_METHODS, MilNet, mil_loss
from engine.mil.protocol import MilConfig, cross_validate

__all__ = ["MIL_METHODS", "MilConfig", "MilDataError", "MilDataset", "MilNet", "cross_validate",
           "list_mil_datasets", "load_mil_dataset", "mil_loss"]
