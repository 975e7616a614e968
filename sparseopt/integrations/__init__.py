"""Glue for training frameworks, one module each, imported only when asked for.

``import sparseopt`` never imports a framework. ``sparseopt.integrations.hf`` works with the
Hugging Face ``transformers.Trainer`` (see ``docs/integrations.md``).
"""

__all__: list[str] = []
