import sys

from audiokd_lib.cli import main

sys.exit(main())
