"""Subcommands of the ``kvprec`` command line, one module each (kvprec/cli.py wires them)."""
