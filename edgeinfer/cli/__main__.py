"""`python -m edgeinfer.cli`: the same as the `edgeinfer` command."""
import sys

from edgeinfer.cli import main

sys.exit(main())
