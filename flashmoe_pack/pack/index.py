"""The index (index.json): building it, loading it, and checking it against the JSON Schema."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import xxhash
from safetensors import safe_open

from . import format as fmt


def schema() -> dict:
    return json.loads(resources.files("flashmoe_pack").joinpath("schema/index.schema.json").read_text())


def build_index(writer, part_dirs: list[Path], extra: dict) -> dict:
    """The index of a finished pack. `writer` is a PackWriter whose records are all complete."""
    lay = writer.layout
    layers = []
    for layer in writer.moe_layers():
        hashes = writer.state["hashes"][str(layer)]
        layers.append({"layer": layer, "file": fmt.expert_file_name(layer),
                       "file_bytes": fmt.expert_file_bytes(writer.num_experts, lay),
                       "xxh64": [hashes[str(e)] for e in range(writer.num_experts)]})
    tensors = {}
    q8 = set(writer.state.get("resident_q8", []))
    for part, names in writer.state["resident"].items():
        path = next(d / part for d in part_dirs if (d / part).exists())
        with safe_open(path, "pt") as f:
            for name in names:
                t = f.get_tensor(name)
                tensors[name] = {"file": f"{fmt.RESIDENT_DIR}/{part}", "dtype": fmt.DTYPE_NAMES[t.dtype],
                                 "shape": list(t.shape), "xxh64": xxhash.xxh64(fmt.tensor_bytes(t)).hexdigest()}
                if name in q8:  # 8-bit words; scales and biases are the tensors name.scales / name.biases
                    tensors[name]["quant"] = {"bits": 8, "group_size": fmt.RESIDENT_Q8_GROUP}
    p = writer.params
    carried = [n for n in fmt.CARRIED_FILES if (writer.ckpt.path / n).is_file()]
    return {
        "format": fmt.FORMAT_NAME,
        "version": fmt.FORMAT_VERSION,
        "model_type": writer.ckpt.model_type,
        "config": writer.ckpt.text_config,
        "source": {**writer.source_info, "float_dtype": fmt.DTYPE_NAMES.get(writer.ckpt.float_dtype, "bfloat16"),
                   "kind": "mlx" if writer.ckpt.mlx_quant else ("fp8" if writer.ckpt.is_fp8 else "float"),
                   "skipped_tensors": writer.state["skipped"]},
        "quantization": {"bits": p["bits"], "group_size": p["group_size"] if p["bits"] != 16 else None,
                         "scale_dtype": p["scale_dtype"] if p["bits"] != 16 else None,
                         "weight_dtype": p["float_dtype"] if p["bits"] == 16 else "int32",
                         "method": p["method"] if p["bits"] != 16 else "none",
                         "packing": "mlx-affine" if p["bits"] != 16 else "none"},
        "experts": {
            "num_experts": writer.num_experts, "hidden_size": writer.hidden, "intermediate_size": writer.inter,
            "alignment": fmt.ALIGN, "header_bytes": fmt.HEADER_BYTES, "record_bytes": lay.record_bytes,
            "stride": lay.stride, "components": [c.to_json() for c in lay.components], "layers": layers,
        },
        "resident": {"dtype": p["resident_dtype"], "tensors": tensors},
        "files": carried,
        **extra,
    }


@dataclass
class PackedIndex:
    """A loaded, schema-checked index with its layout decoded."""

    path: Path  # the packed model directory
    raw: dict
    layout: fmt.RecordLayout

    @property
    def bits(self) -> int:
        return self.raw["quantization"]["bits"]

    @property
    def group_size(self) -> int | None:
        return self.raw["quantization"]["group_size"]

    @property
    def num_experts(self) -> int:
        return self.raw["experts"]["num_experts"]

    @property
    def layers(self) -> list[dict]:
        return self.raw["experts"]["layers"]

    def layer_entry(self, layer: int) -> dict:
        for e in self.layers:
            if e["layer"] == layer:
                return e
        raise KeyError(layer)


def load_index(path: str | Path, validate: bool = True) -> PackedIndex:
    """Load OUT/index.json; raise fmt.FormatError with the reason if it is not a usable index."""
    path = Path(path)
    ip = path / fmt.INDEX_NAME
    if not ip.is_file():
        hint = " (an unfinished quantize: rerun it to resume)" if (path / fmt.BUILD_DIR).exists() else ""
        raise fmt.FormatError(f"{ip}: missing; {path} is not a complete packed model{hint}")
    try:
        raw = json.loads(ip.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise fmt.FormatError(f"{ip}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != fmt.FORMAT_NAME:
        raise fmt.FormatError(f"{ip}: not a flashmoe-pack index (format field is {raw.get('format')!r})"
                              if isinstance(raw, dict) else f"{ip}: not a JSON object")
    if raw.get("version") != fmt.FORMAT_VERSION:
        raise fmt.FormatError(f"{ip}: format version {raw.get('version')!r}; this flashmoe-pack reads "
                              f"version {fmt.FORMAT_VERSION}")
    if validate:
        import jsonschema

        try:
            jsonschema.validate(raw, schema())
        except jsonschema.ValidationError as e:
            where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
            raise fmt.FormatError(f"{ip}: field {where}: {e.message}") from None
    ex = raw["experts"]
    q = raw["quantization"]
    layout = fmt.record_layout(ex["hidden_size"], ex["intermediate_size"], q["bits"], q["group_size"] or 64,
                               q["scale_dtype"] or "bfloat16", q["weight_dtype"] if q["bits"] == 16 else "bfloat16")
    want = [c.to_json() for c in layout.components]
    if ex["components"] != want or ex["stride"] != layout.stride or ex["record_bytes"] != layout.record_bytes:
        raise fmt.FormatError(f"{ip}: experts.components/stride/record_bytes disagree with the layout SPEC.md "
                              f"defines for this geometry and quantization")
    return PackedIndex(path, raw, layout)
