"""Analysis: attention curvature and locality patterns (curvature.py); the studies' capture and study modules
live beside it. Importing this package stays light: no study is imported here."""
from .curvature import (CurvatureResult, LocalityPatterns, attention_curvature, attention_curvature_reference,
                        attention_locality, attention_locality_reference, block_reduce, curvature_reduce,
                        curvature_reduce_reference, leader_clusters)

__all__ = ["CurvatureResult", "LocalityPatterns", "attention_curvature", "attention_curvature_reference",
           "attention_locality", "attention_locality_reference", "block_reduce", "curvature_reduce",
           "curvature_reduce_reference", "leader_clusters"]
