"""``python -m mm_megatron`` == ``mm-megatron``."""

import sys

from mm_megatron.cli import main

sys.exit(main())
