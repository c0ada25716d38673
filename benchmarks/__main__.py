"""`python -m benchmarks` from the repository root, or `python -m outbound.benchmarks` anywhere.

From the root this folder is imported under its own name, `benchmarks`: this
file only hands over to the installed `outbound.benchmarks`, so no second copy
of the benchmark modules (or of the runtime) is loaded under an old name.
"""

import sys

from outbound.benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main())
