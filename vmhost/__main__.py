"""``python -m vmhost`` is the ``vmhost`` command."""

from .cli import vmhost_main

raise SystemExit(vmhost_main())
