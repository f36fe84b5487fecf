"""The engines methods hand their work to.

- `rewrite`: stream a checkpoint into a new one, editing some tensors (and adding some),
  copying the rest file to file; provenance and the report written with it.
- `layerwise`: calibrate a model one decoder layer at a time and edit each layer's
  Linear weights as its statistics are ready (Wanda, Antidote).
"""
