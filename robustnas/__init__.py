"""robustnas: search, adversarially train and honestly evaluate robust architectures."""

__version__ = "0.1.0"
