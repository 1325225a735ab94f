"""python -m asynccache."""

import sys

from asynccache.cli import main

sys.exit(main())
