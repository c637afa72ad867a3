"""Stage scripts (``stage0_sft.py`` …, ``pipeline.py``) and what they share: config, model loading, run directory."""
