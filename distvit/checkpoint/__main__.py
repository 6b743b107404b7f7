import sys

from distvit.checkpoint.cli import main

sys.exit(main())
