"""`python -m orlik` runs the CLI."""

from __future__ import annotations

from orlik.cli import main

if __name__ == "__main__":
    main()
