"""bertforge: turn a BERT masked-LM into validated, deployable ONNX artifacts."""

import os

__version__ = "0.1.0"

# Keep a build from writing outside its output and cache directories. onnxruntime records a
# telemetry event (deviceid, onnxruntime.db) under ~/.cache/Microsoft for every process that
# loads it; ORT_DISABLE_TELEMETRY=1 stops it. BERTFORGE_ALLOW_TELEMETRY=1 leaves the libraries' defaults.
if os.environ.get("BERTFORGE_ALLOW_TELEMETRY") != "1":
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
