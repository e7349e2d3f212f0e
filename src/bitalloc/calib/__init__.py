"""Calibration state read by scorers and quantizers alike: each linear's input
Gram matrix by forward hooks (``grams``, cached per content hash), importance
vectors, routing statistics of MoE layers and calibration gradients
(``state``). Imports no scorer."""
