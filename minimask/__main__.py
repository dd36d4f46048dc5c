"""``python -m minimask <command>``: the ``minimask`` command (see :mod:`minimask.cli`)."""

from minimask.cli import main

raise SystemExit(main())
