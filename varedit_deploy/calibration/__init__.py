"""Calibrated Q/DQ quantisation of exported artifacts (INT8, FP8, INT4 weight-only) and its accuracy report.

`quantize_artifacts` (the `varedit-deploy quantize` command) lives in `calibration.quantize`;
the pieces it composes each own one idea: the calibration set (`dataset`), recording graph
inputs (`backends`), layer groups (`groups`), ModelOpt's PTQ (`ptq`), the sensitivity search
(`sensitivity`), held-out evaluation (`evaluate`), the 8-bit KV cache (`kv_cache`) and the
report (`report`). ModelOpt is imported only when a graph is quantised.
"""
