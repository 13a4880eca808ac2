"""Storage: the precision tiers and page layout (formats.py), the mixed-precision paged buffer over the native
library (buffer.py) and the fixed key rotations (rotation.py). The lowest layer: it imports nothing else of kvprec
but the native loader (docs/architecture.md)."""
