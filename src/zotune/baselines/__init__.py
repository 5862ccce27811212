"""Baselines for comparing against MeZO: in-context learning, linear probing, fine-tuning with Adam.

Each takes a :class:`zotune.train.Prepared` (model, objective, encoded splits) and its own config
dataclass, and returns validation and test metrics; :mod:`zotune.compare` runs them side by side.
"""
