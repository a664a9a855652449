"""Networks picked by registered name: registry (a leaf), unet (U-Net, `build_model`), transformer
(MIRA-U's MIM teacher and hybrid student, registered as 'hybrid')."""
