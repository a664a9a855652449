"""semiseg: semi-supervised medical image segmentation in TensorFlow 2 / Keras 3.

    semiseg train --method mean_teacher --preset cpu      # the installed command
    python main.py train --method mean_teacher --preset cpu   # the same, from a checkout

Importing the package imports nothing else (no TensorFlow): `semiseg.runs` and the pure modules
serve scripts such as `analysis/` that must start fast.
"""
__version__ = "0.1.0"
