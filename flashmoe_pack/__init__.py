"""flashmoe-pack: pack, verify and run Mixture-of-Experts models that do not fit in memory."""

__version__ = "0.1.0"


def load(path=None, device: str = "cpu", **options):
    """Load a packed model for inference: see flashmoe_pack.engine.runtime.load."""
    from .engine.runtime import load as _load

    return _load(path, device=device, **options)


__all__ = ["load", "__version__"]
