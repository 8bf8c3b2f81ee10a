"""Mutual transfer: a placeholder until its own issue lands (the navigation keeps its place)."""

import streamlit as st

st.title("Mutual transfer")
st.info(
    "Two lightweight models trained with a local attention-map transfer loss (the Pearson "
    "correlation of their local maps), judged by Average Drop and Increase in Confidence. "
    "This page arrives with its own issue. Meanwhile, the Compare maps page measures Average "
    "Drop and Increase in Confidence for any trained model."
)
