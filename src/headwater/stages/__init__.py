"""Training-stage attribution: record a run's stages once, then ask which stage is accountable
for a behaviour (and, inside a stage, which records)."""

from .config import StageConfig
from .effects import StageAttribution, StageEffects
from .reconstruct import reconstruct
from .replay import StageReplay
from .trajectory import Trajectory, TrajectoryRecorder

__all__ = ["StageAttribution", "StageConfig", "StageEffects", "StageReplay", "Trajectory", "TrajectoryRecorder", "reconstruct"]
