"""Integrations with training frameworks. Each submodule imports its framework lazily.

- :mod:`zotune.integrations.hf`: :class:`~zotune.integrations.hf.ZOTrainer`, a Hugging Face
  ``Trainer`` that takes MeZO steps (``from zotune.integrations.hf import ZOTrainer``).
"""

__all__ = ["TrainerMeZO", "ZOTrainer"]


def __getattr__(name):
    # transformers is heavy: import it only when the Trainer integration is used.
    if name in ("ZOTrainer", "TrainerMeZO"):
        from zotune.integrations import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'zotune.integrations' has no attribute {name!r}")
