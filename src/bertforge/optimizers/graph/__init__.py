"""Graph rewrites the passes share: ORT's fusion and the SkipLayerNormalization split (ort_fusion.py),
the attention repacks (attention.py), the nodes a quantizer leaves out (exclusions.py), in-place node
edits (edit.py), op counts and the check that an int8 variant quantized something (op_counts.py)."""
