import sys

from dmlkit.cli import main

sys.exit(main())
