"""The model: finding and loading it (``loading``), the units that receive a
bit-width (``units``: a generic walk, blocks, tie groups, experts), model
families as data (``archs``) and GGUF headers read without loading a model
(``gguf_header``). Imports no scorer or quantizer."""
