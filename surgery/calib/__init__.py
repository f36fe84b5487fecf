"""Calibration data (JSONL, chat templates) and activation statistics (hooks, layer-by-layer runner)."""
