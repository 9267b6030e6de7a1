"""`python -m featureatlas …` (and `torchrun -m featureatlas …`) run the command line."""

from featureatlas.cli import main

if __name__ == "__main__":  # spawned site-build workers import this module without running the CLI
    raise SystemExit(main())
