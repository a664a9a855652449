"""The networks of each method, by role, and their variables as a training checkpoint holds them.

    python main.py describe --method mira_u --preset smoke      # parameter count of each network

Training (the methods' `build_networks`) and loading a finished run (semiseg.runs.load,
`--checkpoint latest`) build a method's networks through `method_networks`, so a checkpoint is
restored into exactly the networks that wrote it without importing any training code. A method
whose networks are not in NETWORKS cannot be trained or loaded (tests/test_run_loading.py checks
that every registered method has an entry).
"""
from __future__ import annotations

from semiseg.config import output_channels
from semiseg.errors import ConfigError
from semiseg.models.unet import build_model


def _net(cfg, image_size: int, channels: int, name: str):
    """The configured network, with 1 (binary) or C (multi-class) output channels."""
    return build_model(cfg.model, image_size, channels, name, out_channels=output_channels(cfg.data))


def student_only(cfg, image_size: int, channels: int) -> dict:
    """Networks by role; 'student' is the one the optimizer trains."""
    return {"student": _net(cfg, image_size, channels, "student")}


def student_and_teacher(cfg, image_size: int, channels: int) -> dict:
    """Mean Teacher: a student and an EMA teacher of the same architecture (the method copies the
    student into the teacher when training starts)."""
    return {"student": _net(cfg, image_size, channels, "student"),
            "teacher": _net(cfg, image_size, channels, "teacher")}


def student_and_ema(cfg, image_size: int, channels: int) -> dict:
    """MixMatch: the student and an EMA of its weights, the network the paper evaluates (built
    whatever mixmatch.ema_decay, so checkpoints and train.export=ema mean one thing)."""
    return {"student": _net(cfg, image_size, channels, "student"),
            "ema": _net(cfg, image_size, channels, "ema")}


def mira_u_networks(cfg, image_size: int, channels: int) -> dict:
    """MIRA-U: hybrid CNN-transformer student, MIM-pretrained ViT teacher, and either an EMA copy
    of the student (ema_target=student_ema) or a fast copy of the teacher's head."""
    from semiseg.models.transformer import SegmentationHead, build_hybrid_student, build_mim_teacher
    m, out = cfg.mira_u, output_channels(cfg.data)
    student = build_hybrid_student(image_size, channels, m.student_base_channels,
                                   swin_depth=m.student_swin_depth, name="student", out_channels=out)
    teacher = build_mim_teacher(image_size, channels, m.patch_size, m.embed_dim, m.depth,
                                m.num_heads, dropout=m.teacher_dropout, name="teacher", out_channels=out)
    nets = {"student": student, "teacher": teacher}
    if m.ema_target == "student_ema":
        ema = build_hybrid_student(image_size, channels, m.student_base_channels,
                                   swin_depth=m.student_swin_depth, name="student_ema", out_channels=out)
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


# method name -> networks builder (cfg, image_size, channels) -> {role: keras model or layer}
NETWORKS = {"supervised": student_only, "mixmatch": student_and_ema, "mean_teacher": student_and_teacher,
            "mira_u": mira_u_networks}


def method_networks(method: str, cfg, image_size: int, channels: int) -> dict:
    if method not in NETWORKS:
        raise ConfigError(f"method '{method}' has no networks in semiseg.models.networks.NETWORKS "
                          f"(known: {', '.join(sorted(NETWORKS))})")
    return NETWORKS[method](cfg, image_size, channels)


def model_variables(models: dict) -> dict:
    """Every variable of each network by name, as lists a tf.train.Checkpoint saves and restores.

    Through the model object alone, tf.train.Checkpoint misses Keras 3 layers held in Python lists
    (the ViT teacher's blocks, the hybrid student's cross-attention: measured, 18 of the smoke
    teacher's 47 variables and 48 of the student's 212) and Keras' SeedGenerator states (Dropout's
    RNG). Missed, a resumed run silently continues from freshly initialised weights and RNG."""
    return {name: [v.value for v in m.variables] for name, m in models.items()}
