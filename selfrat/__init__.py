"""The `selfrat` command line: the composition root over the three rooms (engine, store, ui). Nothing in
those rooms imports this package."""
