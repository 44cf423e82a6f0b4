"""Compressed variants of a trained VitrineNet: ONNX (fp32) and int8, run by ONNX Runtime.

Why these two, chosen by measurement (benchmarks/compress.py on the full-catalogue champion):
the ONNX graph alone runs the compact CNN ~3× faster than eager torch at batch 1, and static
int8 (QDQ, per-channel weights, activations calibrated on training images) is the fastest at
every batch size for a loss of < 0.1 accuracy point. *Dynamic* int8 was measured too and is
kept as benchmark rows only: this model is almost all convolutions, which dynamic
quantization either leaves alone (torch: Linear layers only) or runs through ONNX Runtime's
slow ConvInteger kernels (10× slower than fp32).

A variant is produced at registration from the version's own fp32 weights, measured on the
same frozen test split, and stored as an artifact of the same run (`compressed/`), so model,
variant and index always come from one version. `OnnxModel` answers exactly like the torch
model (class logits, L2-normalised embedding; same shapes), so evaluation and serving use it
unchanged. No mlflow here: the registry is passed in. A model with a learned segmenter
(components/model/segmenter.py) has it saved in the same folder (`segmenter.pt`, named in
variants.json): the variant preprocesses exactly like its fp32 model.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from components.model import segmenter as segmenting
from components.model.models import VitrineNet
from components.model.transforms import to_tensor

VARIANTS = ("fp32", "onnx", "int8")
COMPRESSED = ("onnx", "int8")
ARTIFACT_DIR = "compressed"  # the run's artifact folder holding the accepted variants
FILES = {"onnx": "model.onnx", "int8": "model.int8.onnx"}
META_FILE = "variants.json"
OPSET = 17
CALIBRATION_BATCH = 32


class VariantUnavailable(RuntimeError):
    """A variant that cannot be loaded (not produced, refused, or files missing)."""


def export_onnx(model: VitrineNet, path: Path) -> Path:
    """The fp32 graph with a dynamic batch axis. The legacy TorchScript exporter (dynamo=False)
    needs only `onnx`; the dynamo exporter would also need onnxscript for the same graph.
    The graph takes input already at the model's size and channel count (see OnnxModel)."""
    model = model.eval()
    example = torch.zeros(2, model.in_channels, model.image_size, model.image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # deprecation of the legacy exporter; tracer notes
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["pixels"],
            output_names=["logits", "embedding"],
            dynamic_axes={"pixels": batch, "logits": batch, "embedding": batch},
        )
    return path


class _Calibration:
    """Feeds ONNX Runtime's calibrator normalised batches (onnxruntime's CalibrationDataReader
    protocol: get_next() → {input name: array} or None)."""

    def __init__(self, images: np.ndarray, batch: int = CALIBRATION_BATCH) -> None:
        self._batches = iter(range(0, len(images), batch))
        self.images, self.batch = images, batch

    def get_next(self) -> dict[str, np.ndarray] | None:
        start = next(self._batches, None)
        if start is None:
            return None
        return {"pixels": to_numpy(to_tensor(self.images[start : start + self.batch]))}

    def __iter__(self) -> _Calibration:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.get_next()
        if batch is None:
            raise StopIteration
        return batch


def quantize_int8(onnx_path: Path, out_path: Path, calibration: np.ndarray) -> Path:
    """Static int8 (QDQ): int8 per-channel weights, uint8 activations whose ranges come from
    `calibration` (uint8 N×H×W×C images at the model's size, e.g. a sample of the train split)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise ValueError("int8 calibration needs at least one image")
    with tempfile.TemporaryDirectory(prefix="vitrine-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(onnx_path), str(prepared))
        quantize_static(
            str(prepared),
            str(out_path),
            _Calibration(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    return out_path


def quantize_int8_dynamic(onnx_path: Path, out_path: Path) -> Path:
    """ONNX Runtime's dynamic int8 (weights only, activations quantized per call): kept for the
    benchmark's comparison, not served (see the module docstring)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(onnx_path), str(out_path), weight_type=QuantType.QInt8)
    return out_path


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """A plain C-contiguous float32 NCHW array (to_tensor hands out channels-last memory)."""
    return np.ascontiguousarray(x.detach().float().contiguous().numpy(), dtype=np.float32)


def model_meta(model: VitrineNet) -> dict[str, Any]:
    return {
        "image_size": int(model.image_size),
        "in_channels": int(model.in_channels),
        "num_classes": int(model.num_classes),
        "embedding_dim": int(model.embedding_dim),
        "backbone_name": str(model.backbone_name),
        "preprocess": str(getattr(model, "preprocess", "plain")),
        "segmenter": segmenting.FILE if segmenting.segmenter_of(model) is not None else None,
    }


class OnnxModel(nn.Module):
    """An ONNX Runtime session behind VitrineNet's interface: forward(x) → (logits, embedding)
    as torch tensors, plus the attributes serving and evaluation read (image_size, …, and the
    fp32 model's `segmenter`, loaded once with the variant)."""

    def __init__(
        self,
        path: Path,
        variant: str,
        meta: dict[str, Any],
        threads: int | None = None,
        segmenter: segmenting.Segmenter | None = None,
    ):
        super().__init__()
        import onnxruntime as ort

        if not Path(path).is_file():
            raise VariantUnavailable(f"{variant} model file {path} does not exist")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # no notes about folded initializers on every load
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.variant, self.path = variant, Path(path)
        self.image_size, self.in_channels = meta["image_size"], meta["in_channels"]
        self.num_classes, self.embedding_dim = meta["num_classes"], meta["embedding_dim"]
        self.backbone_name = meta["backbone_name"]
        self.preprocess = meta.get("preprocess", "plain")  # variants built before it: plain
        self.segmenter = segmenter
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The same resize / channel repeat as the torch model (the graph has a fixed size).
        x = VitrineNet.adapt_input(self, x)  # type: ignore[arg-type]
        logits, embedding = self.session.run(None, {"pixels": to_numpy(x)})
        return torch.from_numpy(logits), torch.from_numpy(embedding)


def build_variant(model: VitrineNet, variant: str, folder: Path, calibration: np.ndarray) -> Path:
    """Write `variant`'s file into folder (the fp32 ONNX graph is its starting point)."""
    if variant not in COMPRESSED:
        raise ValueError(f"unknown compressed variant {variant!r}: choose one of {COMPRESSED}")
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / FILES["onnx"]
    if not onnx_path.exists():
        export_onnx(model, onnx_path)
    if variant == "int8":
        quantize_int8(onnx_path, folder / FILES["int8"], calibration)
    return folder / FILES[variant]


def write_meta(folder: Path, model: VitrineNet, verdicts: dict[str, dict]) -> Path:
    """variants.json: the model's interface and, per variant, its measured verdict; the model's
    segmenter beside it, if it has one."""
    folder.mkdir(parents=True, exist_ok=True)
    segmenter = segmenting.segmenter_of(model)
    if segmenter is not None:
        segmenter.save(folder / segmenting.FILE)
    path = folder / META_FILE
    path.write_text(json.dumps({**model_meta(model), "variants": verdicts}, indent=2))
    return path


def load_variant(folder: Path, variant: str, threads: int | None = None) -> OnnxModel:
    """The accepted `variant` from a `compressed/` folder, or VariantUnavailable saying why."""
    if variant not in COMPRESSED:
        raise ValueError(f"unknown compressed variant {variant!r}: choose one of {COMPRESSED}")
    meta_path = Path(folder) / META_FILE
    if not meta_path.is_file():
        raise VariantUnavailable(f"no {META_FILE} in {folder}: no compressed variants there")
    meta = json.loads(meta_path.read_text())
    verdict = meta.get("variants", {}).get(variant)
    if not verdict or not verdict.get("passed"):
        reason = (verdict or {}).get("reason", "not produced")
        raise VariantUnavailable(f"variant {variant} is not available: {reason}")
    segmenter = None
    if meta.get("segmenter"):
        segmenter = segmenting.Segmenter.load(Path(folder) / meta["segmenter"])
    return OnnxModel(Path(folder) / FILES[variant], variant, meta, threads, segmenter)


def variant_tag(variant: str) -> str:
    """The version tag holding a variant's verdict ("accepted: …" / "refused: …")."""
    return f"variant_{variant}"


def load_served_model(
    registry: Any, version: str, model: VitrineNet, variant: str, threads: int | None = None
) -> tuple[nn.Module, str, str | None]:
    """(model to serve, its variant name, why the fp32 model serves instead, or None).

    A version whose variant was refused at registration, or registered before variants existed,
    is served in fp32 and the note says why: the variant is never produced at load time."""
    if variant == "fp32":
        return model, "fp32", None
    verdict = registry.version_info(version)["tags"].get(variant_tag(variant), "")
    if not verdict.startswith("accepted"):
        why = verdict or "not produced at registration"
        return model, "fp32", f"version {version} has no {variant} variant ({why}): serving fp32"
    with tempfile.TemporaryDirectory(prefix=f"vitrine-variant-v{version}-") as tmp:
        folder = registry.download_artifacts(version, ARTIFACT_DIR, Path(tmp))
        return load_variant(folder, variant, threads), variant, None  # the session holds the bytes
