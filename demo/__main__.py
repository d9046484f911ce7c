"""``python -m demo`` from the repository root (what ``make demo`` runs)."""

import sys

from demo import main

sys.exit(main())
