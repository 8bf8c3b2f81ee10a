"""Loss-Attention Studio engine: models, losses, training and evaluation.

Never imports streamlit."""
