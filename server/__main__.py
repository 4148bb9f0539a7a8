"""`python -m server serve ...` is `loramux serve ...`."""

import sys

from server.cli import main

sys.exit(main())
