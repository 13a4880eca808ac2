"""The precision study (``kvprec study precision``): curvature by four methods, the precision map, per-block
measured sensitivity and policies at equal memory. Entry point: study.py."""
