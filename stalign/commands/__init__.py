"""Subcommands of the ``stalign`` CLI (see ``stalign.cli.COMMAND_MODULES``)."""
