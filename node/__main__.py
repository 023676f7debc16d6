"""``python -m node`` is the same program as the ``llmarket`` command."""

from node.cli.main import main

raise SystemExit(main())
