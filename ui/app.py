"""The selfrat app: a router over six pages. `selfrat app` (or `streamlit run ui/app.py`) starts it.

Pages read through `store.queries` (via `ui.state.cached`) and start work only as a separate `selfrat`
process (`engine.jobs`); nothing heavy (torch, TRL) is imported here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

# `streamlit run ui/app.py` puts ui/ on sys.path, not the repository root that holds `ui`, `store`, `engine`.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from store import default_who  # noqa: E402
from ui import state  # noqa: E402

st.set_page_config(page_title="selfrat", layout="wide")

with st.sidebar:
    st.caption(f"Workspace: `{state.workspace_path()}`")
    if state.WHO_KEY not in st.session_state:
        st.session_state[state.WHO_KEY] = default_who()
    st.text_input("Who", key=state.WHO_KEY, help="Recorded with every review action in the audit log.")

# The page files live in views/, not pages/: Streamlit still treats a pages/ folder next to the entrypoint
# as a v1 multipage app until st.navigation has run once in the process, and meanwhile serves a deep link
# (e.g. /pairs) by running that file alone, without this sidebar.
pages = [
    st.Page("views/overview.py", title="Overview", icon=":material/monitoring:", default=True),
    st.Page("views/judgments.py", title="Judgments", icon=":material/gavel:"),
    st.Page("views/pairs.py", title="Pairs", icon=":material/compare_arrows:"),
    st.Page("views/launch.py", title="Launch", icon=":material/rocket_launch:"),
    st.Page("views/compare.py", title="Compare", icon=":material/difference:"),
    st.Page("views/evaluation.py", title="Evaluation", icon=":material/leaderboard:"),
]
st.navigation(pages).run()
