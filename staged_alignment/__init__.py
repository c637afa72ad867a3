"""staged_alignment: staged alignment training on the Hugging Face stack (SFT → constitutional DPO → causal stage
against prompt injection → evaluation).

Subpackages, by layer (``.importlinter`` holds the contract; a higher layer may import a lower one, never the
reverse):

- ``staged_alignment.stages``: the entry scripts (``stage0_sft``, ``stage1_dpo``, ``stage2_causal``, ``evaluate``,
  ``pipeline``, ``ablate``, the ``staged-align`` CLI);
- ``staged_alignment.evaluation``: the evaluation runner, judges of injection, metrics, suites, adaptive attacks;
- ``staged_alignment.trainers``: the SFT, DPO and causal trainers and their losses;
- ``staged_alignment.data_builders``: SFT rows, critique-and-rewrite pairs, triplets, seed data;
- ``staged_alignment.core``: config, model loading, run directory, Hub, I/O, chat template, shared stage helpers.

In an installed wheel the subpackages sit in this folder. In a checkout they are the repository's top-level folders
(setuptools ``package-dir`` maps them at install time); the line below makes ``import staged_alignment.stages``
find them there too, so ``python stages/pipeline.py`` runs without an install.
"""
import os as _os

if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "core")):  # a checkout: subpackages beside this folder
    __path__.append(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
