"""`python -m selfrat ...`: the same as the `selfrat` script (engine.jobs starts jobs this way)."""

from selfrat.cli import main

if __name__ == "__main__":
    main()
