"""Mean Teacher's spec: its config section, value rules and networks (the Trainer: trainer.py).

    python main.py train --method mean_teacher --preset smoke --set mean_teacher.consistency=10
"""
from __future__ import annotations

from dataclasses import dataclass

from semiseg.methods.spec import MethodSpec, register
from semiseg.rules import AT_LEAST_0, DECAY


@dataclass
class MeanTeacherConfig:
    ema_decay: float = 0.99            # seed project; the MIRA-U seed uses 0.999
    consistency: float = 0.1           # maximum consistency weight (SSL4MIS; MSE over probabilities)
    rampup_epochs: float = 10.0        # sigmoid ramp exp(-5(1-t/T)^2)
    noise_std: float = 0.1             # Gaussian input noise, in units of each image's intensity std
    noise_clip: float = 0.2            # noise clamped to +-noise_clip (SSL4MIS); 0 = not clamped
    noise_on: str = "teacher"          # teacher: only the teacher's view is noised, the student sees the
                                       # image (SSL4MIS, the segmentation reference code); both: independent
                                       # draws for both views (the paper's classifiers)
    evaluate_teacher: bool = True      # score (and select/export) the teacher; false = the student only
    ema_warmup: bool = True            # decay min(1 - 1/(n+1), ema_decay) after n updates (the paper's code)
    consistency_on_labeled: bool = True  # consistency on labelled images too (the paper: on all images)
    probe_cases: int = 32              # hidden-truth cases scoring the teacher's targets per epoch; 0 = off
    student_view: str = "noise"        # noise | strong: the student's view gets photometric strong
                                       # augmentation (jitter, blur, noise, cutout) on top of its noise
    teacher_bn: str = "batch"          # batch (the paper's code): teacher BN on batch statistics during
                                       # training, its own moving statistics (for evaluation) from them;
                                       # moving: inference mode on the EMA of the student's statistics
                                       # (the teacher then trailed the student: label-efficiency bench)
    teacher_forward: str = "joint"     # joint (the papers' code): one teacher pass over every image the
                                       # consistency is on; as_student: the passes follow
                                       # train.labeled_forward, so with separate the teacher's BN normalises
                                       # labelled and unlabelled images apart, as the student's does


def build_networks(cfg, image_size: int, channels: int) -> dict:
    """A student and an EMA teacher of the same architecture (the trainer copies the student into
    the teacher when training starts)."""
    from semiseg.models.networks import configured_network
    return {role: configured_network(cfg, image_size, channels, role) for role in ("student", "teacher")}


SPEC = register(MethodSpec(
    name="mean_teacher", summary="student + EMA teacher, ramped MSE consistency between their predictions",
    paper="Tarvainen & Valpola, NeurIPS 2017", build_networks=build_networks, networks=("student", "teacher"),
    uses_unlabeled=True, config=MeanTeacherConfig,
    ranges={"ema_decay": DECAY, "consistency": AT_LEAST_0, "rampup_epochs": AT_LEAST_0, "noise_std": AT_LEAST_0,
            "noise_clip": AT_LEAST_0, "probe_cases": AT_LEAST_0},
    choices={"student_view": ("noise", "strong"), "noise_on": ("teacher", "both"), "teacher_bn": ("batch", "moving"),
             "teacher_forward": ("joint", "as_student")},
    preset_sections={"smoke": {"rampup_epochs": 1.0}, "smoke_multiclass": {"rampup_epochs": 1.0},
                     "cpu": {"rampup_epochs": 5.0}, "bench": {"rampup_epochs": 40.0},
                     "bench_tuned": {"consistency": 1.0}},
    unsup_weight="mean_teacher.consistency"))
