"""mlatlas — an atlas of modern machine-learning methods in PyTorch.

Each method is a reusable component (``mlatlas.<field>.<module>``), a parity test against the
production library, and an experiment that reproduces the paper's headline claim
(``mlatlas run <id>``). Importing the package is cheap: nothing here imports torch.
"""

__version__ = "0.1.0"
