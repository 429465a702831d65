import sys

from nextserve.cli import main

sys.exit(main())
