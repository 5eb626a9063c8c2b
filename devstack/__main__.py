"""``python -m devstack``: the local demo (:func:`devstack.demo.main`)."""

import sys

from .demo import main

sys.exit(main())
