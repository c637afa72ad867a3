"""Trainer subclasses, one per stage (``sft.py``, ``dpo.py``, ``causal.py``), the causal losses and callbacks."""
