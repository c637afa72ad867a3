"""The entry scripts: ``stage0_sft.py``, ``stage1_dpo.py``, ``stage2_causal.py``, ``evaluate.py``, ``pipeline.py``,
``ablate.py`` and the ``staged-align`` CLI. Library code lives in :mod:`staged_alignment.core` and the layers above
it."""
