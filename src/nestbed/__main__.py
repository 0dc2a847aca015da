import sys

from nestbed.cli import main

sys.exit(main())
