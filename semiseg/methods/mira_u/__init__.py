"""MIRA-U's spec: its config section, value rules, networks and presets (the Trainer: trainer.py).

    python main.py train --method mira_u --preset smoke
    python main.py train --preset isic2016_10 --data data/ISIC2016
"""
from __future__ import annotations

from dataclasses import dataclass

from semiseg.errors import ConfigError
from semiseg.methods.spec import MethodSpec, register
from semiseg.rules import AT_LEAST_0, AT_LEAST_1, DECAY, FRACTION, POSITIVE


@dataclass
class MiraUConfig:
    teacher_checkpoint: str = ""       # a stage-1 teacher (.keras) to start stage 2 from
    mim_epochs: int = 50
    mim_lr: float = 1e-3
    mim_batch_size: int = 16
    mask_ratio: float = 0.8
    patch_size: int = 8
    embed_dim: int = 256
    depth: int = 4
    num_heads: int = 4
    teacher_dropout: float = 0.1
    # hybrid: the paper's CNN-Transformer student (student_* below). model: the network model.*
    # configures, the U-Net every other method trains: a comparison on one network, so a difference to
    # supervised is the method's and not the architecture's (not the paper; docs/mira_u.md).
    student: str = "hybrid"
    student_base_channels: int = 32
    student_swin_depth: int = 2        # Swin blocks per student stage (1 makes tests trace faster)
    mc_samples: int = 20               # M
    mc_chunk: int = 0                  # 0 = all M passes in one batched forward
    kappa: float = 0.5
    tau_u: float = 0.15
    # shrink: the seed's soft label y~ = w * mu. weight: y~ = mu with each pixel's BCE weighted by w
    # (the multi-class rule's reading; not the seed: shrinking leans uncertain pixels to background).
    # Binary labels only: with data.classes the pseudo label is one-hot and its CE always weighted by w.
    pseudo_label: str = "shrink"
    lambda_u: float = 1.0
    lambda_c: float = 0.1
    gamma: float = 0.01
    rampup_epochs: float = 80.0
    ema_decay: float = 0.999
    ema_target: str = "student_ema"    # student_ema | teacher_head  (see docs/mira_u.md)
    probe_cases: int = 32              # hidden-truth unlabeled cases scored for pseudo-label Dice per epoch; 0 = off


def build_networks(cfg, image_size: int, channels: int) -> dict:
    """MIRA-U: hybrid CNN-transformer student (or model.*'s network: mira_u.student=model),
    MIM-pretrained ViT teacher, and either an EMA copy of the student (ema_target=student_ema) or a
    fast copy of the teacher's head."""
    from semiseg.config import output_channels
    from semiseg.models.transformer import SegmentationHead, build_hybrid_student, build_mim_teacher
    from semiseg.models.networks import configured_network
    m, out = cfg.mira_u, output_channels(cfg.data)

    def student_network(name):
        if m.student == "model":
            return configured_network(cfg, image_size, channels, name)
        return build_hybrid_student(image_size, channels, m.student_base_channels,
                                    swin_depth=m.student_swin_depth, name=name, out_channels=out)
    student = student_network("student")
    teacher = build_mim_teacher(image_size, channels, m.patch_size, m.embed_dim, m.depth,
                                m.num_heads, dropout=m.teacher_dropout, name="teacher", out_channels=out)
    nets = {"student": student, "teacher": teacher}
    if m.ema_target == "student_ema":
        ema = student_network("student_ema")
        ema.set_weights(student.get_weights())
        nets["student_ema"] = ema
    else:
        tv = teacher.config_values
        fast = SegmentationHead(tv["patch_size"], tv["head_channels"], tv["dropout"],
                                out_channels=tv["out_channels"], name="teacher_head_fast")
        fast.build((None, teacher.grid, teacher.grid, tv["embed_dim"]))
        fast.set_weights(teacher.seg_head.get_weights())
        nets["teacher_head_fast"] = fast
    return nets


def validate(cfg) -> None:
    """MIRA-U builds its teacher from mira_u.*, its student from mira_u.student_* (hybrid) or from
    model.* (mira_u.student=model, checked by the shared model.* rules: uses_model_config)."""
    size, mu = cfg.data.image_size, cfg.mira_u
    if mu.student == "hybrid" and size % 16:
        raise ConfigError(f"data.image_size: {size} must be a multiple of 16 (MIRA-U's hybrid student)")
    if size % mu.patch_size:
        raise ConfigError(f"data.image_size: {size} must be a multiple of mira_u.patch_size = {mu.patch_size} "
                          f"(MIRA-U's ViT teacher)")
    if mu.embed_dim % mu.num_heads:
        raise ConfigError(f"mira_u.embed_dim: {mu.embed_dim} must be a multiple of mira_u.num_heads = {mu.num_heads}")


_SMOKE = {"mim_epochs": 1, "mim_batch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2, "student_base_channels": 4,
          "student_swin_depth": 1, "mc_samples": 3, "rampup_epochs": 1.0, "patch_size": 8}

# MIRA-U on ISIC-2016 with the seed's hyperparameters (docs/mira_u.md). The seed splits 80% train /
# 20% test; validation (model selection) is carved out of that 80% (10% of all images, so 70%
# train), and the labeled fraction is of the remaining training images. Pass --data ISIC_ROOT.
_ISIC = {
    f"isic2016_{fraction}": {
        "method": "mira_u",
        "data": {"format": "isic", "image_size": 256, "channels": 3, "labeled_fraction": fraction / 100,
                 "test_fraction": 0.2, "val_fraction": 0.1},
        "train": {"epochs": 150, "batch_size": 4, "lr_reference_batch": 4, "lr": 1e-3, "lambda_dice": 0.5,
                  "lambda_bce": 0.5, "unlabeled_ratio": 1},
        "mira_u": {"mim_epochs": 50, "mim_lr": 1e-3, "mim_batch_size": 16, "mask_ratio": 0.8, "patch_size": 8,
                   "mc_samples": 20, "kappa": 0.5, "tau_u": 0.15, "ema_decay": 0.999, "rampup_epochs": 80.0,
                   "lambda_u": 1.0, "lambda_c": 0.1, "gamma": 0.01},
    }
    for fraction in (10, 20, 30, 50)
}

SPEC = register(MethodSpec(
    name="mira_u", summary="MIM-pretrained ViT teacher, MC-dropout uncertainty-weighted soft pseudo labels, "
                           "hybrid CNN-transformer student, EMA teacher",
    paper="Qamar, arXiv:2510.15354, 2025 (MIRA-U)", build_networks=build_networks, networks=("student", "teacher"),
    uses_unlabeled=True, config=MiraUConfig, validate=validate,
    uses_model_config=lambda cfg: cfg.mira_u.student == "model",
    ranges={"mim_epochs": AT_LEAST_0, "mim_lr": POSITIVE, "mim_batch_size": AT_LEAST_1,
            "mask_ratio": (lambda v: 0 < v < 1, "in (0, 1)"),
            "patch_size": (lambda v: v >= 1 and not v & (v - 1), "a power of two"),
            "embed_dim": AT_LEAST_1, "depth": AT_LEAST_1, "num_heads": AT_LEAST_1, "teacher_dropout": DECAY,
            "student_base_channels": AT_LEAST_1, "student_swin_depth": AT_LEAST_1,
            # One MC pass has no spread: sigma = 0 and every pixel counts as certain.
            "mc_samples": (lambda v: v >= 2, ">= 2"), "mc_chunk": (lambda v: v >= 0, ">= 0 (0 = all at once)"),
            "kappa": POSITIVE, "tau_u": FRACTION, "lambda_u": AT_LEAST_0, "lambda_c": AT_LEAST_0, "gamma": AT_LEAST_0,
            "rampup_epochs": AT_LEAST_0, "ema_decay": DECAY, "probe_cases": AT_LEAST_0},
    choices={"ema_target": ("student_ema", "teacher_head"), "student": ("hybrid", "model"),
             "pseudo_label": ("shrink", "weight")},
    # bench: the networks scaled as the U-Net is (seed: 256-d ViT, 4 layers, 8x8 patches at 256 px;
    # here 64-d, 2 layers, 4x4 patches at 64 px: a 16x16 token grid), its ramp over 80/150 of the
    # run as in its seed, EMA 0.99 for a 1600-step run (0.999 fits the seed's ~24k steps).
    preset_sections={"smoke": _SMOKE, "smoke_multiclass": _SMOKE,
                     "bench": {"embed_dim": 64, "depth": 2, "num_heads": 2, "patch_size": 4, "student_base_channels": 16,
                               "mim_epochs": 20, "rampup_epochs": 21.0, "ema_decay": 0.99},
                     # the tuning budget's pick on validation (0.1 / 1 / 10: 0.549 / 0.550 / 0.554; tuning.json)
                     "bench_tuned": {"lambda_u": 10.0}},
    presets=_ISIC, unsup_weight="mira_u.lambda_u"))
