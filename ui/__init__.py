"""The Streamlit app (`selfrat app`): ui/app.py routes to the pages in ui/views/. It reads through
`store.queries` and starts work as separate `selfrat` processes through `engine.jobs`."""
