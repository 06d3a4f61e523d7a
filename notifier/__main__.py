"""``python -m notifier`` is the ``notifier`` console script."""

from notifier.cli import main

raise SystemExit(main())
