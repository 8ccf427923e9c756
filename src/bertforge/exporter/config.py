"""The export stage's recipe section."""

from __future__ import annotations

from pydantic import Field, StrictInt

from bertforge.section import Section


class ExportConfig(Section):
    # 17: the first opset with a native LayerNormalization; ORT's BERT fusion is fully exercised on it
    # and it avoids opset 18's reworked Reduce* ops where LayerNorm fusion regressed (ORT #16341).
    opset: StrictInt = Field(17, ge=14, le=21)
