"""``python -m zotune.compare SPEC``: the child process of an isolated cell."""

import sys

from zotune.compare import _cell_main

sys.exit(_cell_main(sys.argv[1]))
