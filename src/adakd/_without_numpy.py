"""`pip install adakd` installs the losses with torch alone. torch then warns on import that NumPy is missing, which
the losses never use, and which would put a second line before the CLI's one-line error naming the extra a command
needs. Silence exactly that warning; imported by the package before torch."""

import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
