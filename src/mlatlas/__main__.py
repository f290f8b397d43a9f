"""``python -m mlatlas …`` (what ``torchrun … -m mlatlas train …`` runs): the ``mlatlas`` CLI."""

import sys

from mlatlas.cli import main

sys.exit(main())
