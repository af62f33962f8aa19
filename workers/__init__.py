"""Data plane of vramsweep: everything that runs inside one trial.

Backbones, PEFT methods, checkpointing strategies, datasets and meters are
registries keyed by lowercase names; ``workers.trial.run_trial`` turns one
``TrialSpec`` into one ``TrialRecord``.
"""
