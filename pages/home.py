"""Home: what Loss-Attention is, the key equations, the shipped model's card, one click on."""

import re
from pathlib import Path

import streamlit as st

from engine.catalog import (
    FAMILY_DEFAULT_GAMMA,
    FAMILY_PREFIX,
    backbone_catalog,
    family_checkpoint_name,
    head_catalog,
)
from engine.safe_io import JSON_CAP, read_text
from ui.st_guards import guard
from ui.st_links import ensure_router
from ui.st_models import DEFAULT_SHIPPED, SHIPPED_DIR
from ui.st_session import MODEL_KEY, remember
from ui.tables import markdown_table

RESULTS = SHIPPED_DIR.parent / "results" / "gamma_family"  # engine.gamma_family.RESULTS

DEFAULT_CARD = SHIPPED_DIR / f"{DEFAULT_SHIPPED}.md"
# The card's training line (engine.export.model_card): the run's length and its ramp-up.
TRAINING = re.compile(r"(?P<epochs>\d+) epochs, batch .*?γmax = (?P<gamma>[0-9.]+) ramped over "
                      r"(?P<ramp>\d+) epochs")


def _text(path: Path) -> str:
    """A card or table shipped beside the models: small text, read within a cap."""
    return read_text(path, JSON_CAP, "a model card")


def shipped_ramp() -> dict | None:
    """The default model's epochs, γmax and ramp length as its card states them (read here,
    not from the checkpoint: Home never waits for torch); None where the card says no ramp."""
    try:
        match = TRAINING.search(_text(DEFAULT_CARD))
    except (OSError, ValueError):
        return None
    if match is None or int(match["ramp"]) < 1:
        return None
    return {"epochs": int(match["epochs"]), "gamma": match["gamma"], "ramp": int(match["ramp"])}


def loss_equations() -> None:
    """Eq. 5 and the loss, with the ramp-up of the model a first visit explains: its own
    length in the formula, the paper's (80 of 200 epochs) beside it in words."""
    ramp = shipped_ramp()
    length = str(ramp["ramp"]) if ramp else "R"
    st.latex(r"z = \sum_m \alpha_m O_m,\qquad L = \mathrm{CE}(z, y) + w(\tau)\sum_m \alpha_m\,"
             rf"\mathrm{{CE}}(O_m, y),\quad w(\tau) = \gamma_{{\max}} e^{{-5(1-\tau/{length})^2}}"
             rf"\ (\tau < {length})")
    if ramp:
        how = (f"{length} is the shipped model's ramp: {DEFAULT_SHIPPED} ramps up over the first "
               f"{length} of its {ramp['epochs']} epochs, to γmax = {ramp['gamma']} (the paper: "
               "over 80 of 200 epochs)")
    else:
        how = "R is the ramp's length (the paper: 80 of 200 epochs)"
    st.caption("M patches, ξ ∈ [0, 1] the threshold (ξ = 0 keeps every patch, ξ = 1 keeps the "
               "above-average ones), τ the epoch; w(τ), the Gaussian ramp-up of the patch loss, "
               f"reaches γmax at epoch {length} and stays there. {how}.")


ensure_router()
st.title("Loss-Attention Studio")
st.markdown(
    "See **why** a CNN decided. Loss-Attention (Shi et al., IEEE TIP 2021) makes an image's "
    "prediction a weighted sum of its patches' predictions. The patch logits come from the same "
    "classifier as the image logit, and a patch's weight is its share of the logit norms, "
    "thresholded by ξ. A patch loss with weight γmax, ramped up over training, makes the "
    "selected patches agree with the image label."
)
st.latex(r"O_m = W h_m + b,\qquad \hat a_m = \frac{\lVert O_m\rVert_2}{\sum_j \lVert O_j\rVert_2},"
         r"\qquad \alpha_m = \frac{\max(\hat a_m - \xi/M,\,0)}{\sum_j \max(\hat a_j - \xi/M,\,0)}")
loss_equations()

go, slide = st.columns(2)
if go.button(f"Open the Patch Explorer on the shipped model, {DEFAULT_SHIPPED}", type="primary",
             key="home_go"):
    st.switch_page("pages/explorer.py")
if slide.button("Slide γmax: the shipped family, 0 to 3", key="home_gamma",
                help="The Patch Explorer on the default digits model trained at seven values "
                     "of γmax, with a γmax slider beside the ξ slider"):
    remember(MODEL_KEY, f"shipped: {Path(family_checkpoint_name(FAMILY_DEFAULT_GAMMA)).stem}")
    st.switch_page("pages/explorer.py")

with guard("The model cards", stop=False):
    cards = [c for c in sorted(Path(SHIPPED_DIR).glob("*.md")) if c.name.lower() != "readme.md"]
    family = [c for c in cards if c.stem.startswith(FAMILY_PREFIX)]
    # The default model first and open; beside it, its ablation partner (trained without the
    # patch loss): together they are the paper's Table VI on the embedded default.
    pair = sorted((c for c in cards if c not in family), key=lambda c: c.stem != DEFAULT_SHIPPED)
    for position, card in enumerate(pair):
        with st.expander(f"Model card: {card.stem}", expanded=position == 0):
            st.markdown(_text(card))
    if family:
        with st.expander(f"Model cards: the γmax family ({len(family)} models)"):
            table = RESULTS / "results.md"
            if table.is_file():
                st.markdown(_text(table).replace("# ", "#### ", 1))
            for card in sorted(family, key=lambda c: float(c.stem[len(FAMILY_PREFIX):])):
                st.markdown("---\n" + _text(card).replace("# ", "#### ", 1))

# The catalog, not the model registry (which imports torch), and markdown tables, not data
# frames (pandas and pyarrow): Home is the first page, and it waits on neither.
left, right = st.columns(2)
with left:
    st.subheader("Backbones")
    st.markdown(markdown_table([{"backbone": name, "description": text}
                                for name, text in backbone_catalog().items()]))
with right:
    st.subheader("Heads")
    st.markdown(markdown_table([{"head": name, "description": text}
                                for name, text in head_catalog().items()]))
