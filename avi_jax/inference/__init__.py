"""Inference (paper Fig. 2) from a trained workdir: the loaded system (``system``), long-audio windows and
length buckets (``windows``), batched synthesis (``pipeline``) and the files written (``outputs``)."""
