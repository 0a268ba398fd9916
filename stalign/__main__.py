import sys

from stalign.cli import main

sys.exit(main())
