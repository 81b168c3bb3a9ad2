"""Training-stage attribution: record a run's stages once, then ask which stage is accountable
for a behaviour (and, inside a stage, which records)."""

from .effects import StageAttribution, StageEffects
from .trajectory import Trajectory, TrajectoryRecorder, reconstruct

__all__ = ["StageAttribution", "StageEffects", "Trajectory", "TrajectoryRecorder", "reconstruct"]
