"""One module per `visto` sub-command; see visto/cli.py for the contract."""
