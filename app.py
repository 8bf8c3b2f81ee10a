"""Loss-Attention Studio: ``streamlit run app.py``.

The router: every page is registered here with ``st.navigation``. Pages live in ``pages/`` and
stay thin (they call ``engine`` and ``ui``). The sidebar parts every page shares (the model to
explain, the device, the run folder) are drawn here, once.
"""

import streamlit as st

from engine.roots import confine_reads_to, data_roots
from ui.st_gamma import adopt_link_gamma
from ui.st_guards import guard
from ui.st_links import adopt_link, router_ran
from ui.st_models import device_footer, model_picker

st.set_page_config(page_title="Loss-Attention Studio", layout="wide")
# A server reads data only inside its data roots, links followed, and so does every job it
# starts (they inherit the setting): whoever opens the page must not reach the server's other
# folders. Set on every script run, so that a root created meanwhile counts.
confine_reads_to(data_roots())

PAGES = {
    "Explore": [
        st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
        st.Page("pages/explorer.py", title="Patch Explorer", icon=":material/grid_on:",
                url_path="explorer"),
        st.Page("pages/compare.py", title="Compare maps", icon=":material/compare:",
                url_path="compare"),
        st.Page("pages/curves.py", title="Curves", icon=":material/show_chart:",
                url_path="curves"),
    ],
    "Train": [
        st.Page("pages/train.py", title="Train", icon=":material/play_circle:", url_path="train"),
        st.Page("pages/runs.py", title="Runs", icon=":material/table_rows:", url_path="runs"),
        st.Page("pages/sweep.py", title="Sweep", icon=":material/grid_view:", url_path="sweep"),
        st.Page("pages/stride.py", title="Stride / time", icon=":material/timer:",
                url_path="stride"),
    ],
    "More methods": [
        st.Page("pages/mil.py", title="MIL", icon=":material/inventory_2:", url_path="mil"),
        st.Page("pages/transfer.py", title="Mutual transfer", icon=":material/sync_alt:",
                url_path="transfer"),
    ],
}

navigation = st.navigation(PAGES)
router_ran()
with guard("The link", stop=False):
    # Before the sidebar: a link's model (and the model of its family at the link's γmax)
    # is the one to explain.
    adopt_link_gamma(adopt_link())
with st.sidebar, guard("The sidebar", stop=False):
    model_picker()
navigation.run()
# After the page, so that the page never waits for torch to import just for this line.
with guard("The device line", stop=False):
    device_footer()
