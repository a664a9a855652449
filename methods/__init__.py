"""Semi-supervised methods, one module each; importing this package registers them by name.

    python main.py train --method mean_teacher --preset smoke
"""
from methods import mira_u  # noqa: F401,E402
