"""The ``llmarket`` command, one module per command group; ``node.cli.main`` parses and dispatches."""
