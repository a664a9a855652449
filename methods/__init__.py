"""Semi-supervised methods, one module each; importing this package registers them by name.

    python main.py train --method mean_teacher --preset smoke
"""
from methods import mean_teacher, mira_u, mixmatch  # noqa: E402,F401  (registration by import)
