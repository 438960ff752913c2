"""Readers of source checkpoints (HF float, FP8 block-scaled, MLX 4-bit)."""

from .checkpoint import Checkpoint, ExpertPiece, Resident, Skipped, SourceError

__all__ = ["Checkpoint", "ExpertPiece", "Resident", "Skipped", "SourceError"]
