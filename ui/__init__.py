"""The Streamlit app (browse judgments, audit pairs, launch iterations) lands with the app issue; until then
`selfrat demo` and the CLI are the way in. The app reads through `store` and starts work through the CLI."""
