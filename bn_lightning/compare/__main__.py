import sys

from bn_lightning.compare.cli import main

sys.exit(main())
