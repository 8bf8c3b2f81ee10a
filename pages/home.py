"""Home: what Loss-Attention is, and which models the engine can build."""

import streamlit as st

from engine.models import backbone_descriptions, head_spec, list_heads

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
st.latex(r"z = \sum_m \alpha_m O_m,\qquad L = \mathrm{CE}(z, y) + w(\tau)\sum_m \alpha_m\,"
         r"\mathrm{CE}(O_m, y),\quad w(\tau) = \gamma_{\max} e^{-5(1-\tau/80)^2}")

left, right = st.columns(2)
with left:
    st.subheader("Backbones")
    st.table({"backbone": list(backbone_descriptions()),
              "description": list(backbone_descriptions().values())})
with right:
    st.subheader("Heads")
    st.table({"head": list_heads(), "description": [head_spec(h).description
                                                    for h in list_heads()]})
st.info("Training, the patch explorer and the other pages arrive with the next releases. "
        "Meanwhile the engine is scriptable: `python -m engine models`, `python -m engine bench`.")
