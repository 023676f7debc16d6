"""``python -m node`` is the same program as the ``llmarket`` command."""

from node.cli import main

raise SystemExit(main())
