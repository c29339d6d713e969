"""`python -m neurojepa_pl` is the same as the `neurojepa` console script."""

from neurojepa_pl.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
