"""Loss-Attention Studio: ``streamlit run app.py``.

The router: every page is registered here with ``st.navigation``; pages live in ``pages/`` and
stay thin (they call ``engine``).
"""

import streamlit as st

st.set_page_config(page_title="Loss-Attention Studio", layout="wide")

navigation = st.navigation([
    st.Page("pages/home.py", title="Home", default=True),
])
navigation.run()
