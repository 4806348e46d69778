"""``python -m ha.coordinator``: what ``ocf:sipha:coordinator`` starts."""

import sys

from ha.coordinator.service import main

sys.exit(main())
