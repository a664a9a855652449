"""Networks from a checkout: re-exports semiseg.models.unet (`build_model`, `MODELS`, `register_model`).

    python -c "import models_tf2, config; print(models_tf2.build_model(config.ModelConfig(), 64, 1).count_params())"
"""
from semiseg.models.unet import *  # noqa: F401,F403  (the public API, unchanged)
