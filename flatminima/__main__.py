"""``python -m flatminima ...`` (also under ``torchrun -m flatminima train ...``)."""

import sys

from flatminima.experiment.cli import main

if __name__ == "__main__":
    sys.exit(main())
