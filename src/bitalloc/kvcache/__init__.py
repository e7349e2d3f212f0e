"""The key-value cache as units that receive bits.

A KV unit is one attention head's keys or values in one layer
(``layer3.k.head1``); every token writes one vector of ``head_dim`` values to
each unit. The stage mirrors the weight pipeline:

- ``layout``: the units of a model, read from its config (layers, KV heads,
  head dimension), and what a choice of codecs costs per token and at a
  context length;
- ``cache``: a transformers cache that quantizes keys and values with each
  unit's codec as they are written, and a recorder of the cached vectors;
- ``policy``: per-token precision (Don't Waste Bits): a rule on token
  features at write time, thresholds fitted to an average bit budget;
- ``plan``: the cache plan file, unit -> codec, versioned JSON;
- ``score``: the error table (measured end-to-end KL per unit, or the
  vectors' own reconstruction error) and ``allocate``: budget, solver, guard,
  and the llama.cpp K/V type pair.

The codecs themselves are formats (``bitalloc.formats.kv``).
"""
