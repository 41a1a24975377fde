"""`python -m wavecast.daemon ...` is the `wavecast` command."""

import sys

from wavecast.daemon.cli import main

sys.exit(main())
