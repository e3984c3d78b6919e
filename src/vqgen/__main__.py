"""``python -m vqgen`` runs the ``vqgen`` command."""

from vqgen.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
