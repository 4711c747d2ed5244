import sys

from ddfm.cli import main

sys.exit(main())
