"""`python -m ghostline ...` runs the `ghostline` command."""

import sys

from ghostline.lsp.cli import main

if __name__ == "__main__":
    sys.exit(main())
