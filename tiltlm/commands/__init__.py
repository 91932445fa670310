"""One module per ``tiltlm`` subcommand, each with ``add_arguments(parser)`` and ``run(args) -> int``.

The library never imports from here."""
