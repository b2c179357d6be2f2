"""Everything that serves a trained model, apart from training: the predictor (Python API and
`tools/predict.py`), how its forward runs (compile mode, attention kernel, precision), tiled
prediction of large images, the streamed JSON result files, and the ONNX graph and export."""
