"""`python -m modelcore ...` entry point."""
import sys

from modelcore.cli import main

sys.exit(main())
