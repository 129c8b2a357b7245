"""`python -m edgeinfer`: the same as the `edgeinfer` command."""
import sys

from edgeinfer.cli import main

sys.exit(main())
