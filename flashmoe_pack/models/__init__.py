"""Model architectures, one module per HF model_type, behind a small registry.

    cls = get_model_class(config_json["model_type"])
    model = cls(cls.config_class.from_dict(config_json), resident_weights, experts)
"""

from __future__ import annotations

_REGISTRY: dict[str, type] = {}


def register(*model_types: str):
    """Class decorator: make the class the model for each of `model_types` (HF model_type names)."""

    def wrap(cls: type) -> type:
        for name in model_types:
            _REGISTRY[name] = cls
        return cls

    return wrap


def get_model_class(model_type: str) -> type:
    """The model class registered for an HF model_type; ValueError naming the supported ones."""
    try:
        return _REGISTRY[model_type]
    except KeyError:
        supported = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {supported}") from None


def supported_model_types() -> list[str]:
    """All registered model_type names, sorted."""
    return sorted(_REGISTRY)


# Imported last so that the model modules find `register` defined.
from flashmoe_pack.models import qwen3_5_moe  # noqa: E402,F401
