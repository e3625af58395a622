"""``python -m app.cli``: what the ``steward`` script runs (and how ``steward up`` starts its children)."""

from app.cli import main

if __name__ == "__main__":
    main()
