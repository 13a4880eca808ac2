"""Analysis studies, one subpackage each, run by ``kvprec study <name>`` (docs/architecture.md)."""
