"""One module per `openkcm` command, each with `register(subparsers)`."""
