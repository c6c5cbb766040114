"""A testbed where the demonstrations' distribution is known exactly (issue 21).

- :mod:`analysis.testbed.distribution`: the stochastic program (``DataSpec``, ``TARGET``,
  ``BASE``, ``TaskDistribution``): sampling and the exact ``log p_data(y | x)``.
- :mod:`analysis.testbed.model`: the character tokenizer with a chat template, a small Llama
  (``ModelSpec``), its pretrained base (``PretrainSpec``, ``pretrained_base``), exact
  ``sequence_logps`` and ``sample`` through the LLM path's own functions.
- :mod:`analysis.testbed.measures`: forward and reverse KL, entropy, accuracy, classifier fit,
  each with a 95% interval.

See ``analysis/testbed/README.md``.
"""
