"""`python -m opd ...` (and `torchrun -m opd distill ...`) run the CLI."""

from opd.cli import main

if __name__ == "__main__":
    main()
