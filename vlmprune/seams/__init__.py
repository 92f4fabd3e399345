"""The places a method can act, one module each; a seam knows no method.

Every seam has the same shape: ``Seam(adapter, method, handle)`` and ``install(hooks)``, called by
:meth:`vlmprune.method.Method.install` for each class in the method's ``seams``. What the method must
implement for a seam is written at the top of the seam's module:

* :mod:`~vlmprune.seams.encoder`: inside the vision tower (block layouts a method runs or merges in);
* :mod:`~vlmprune.seams.pre_llm`: between projector and LLM (``PreLLMMethod.reduce`` per visual group);
* :mod:`~vlmprune.seams.in_llm`: after decoder layers (an exit or a pruning policy; all or some visual
  rows leave every later layer, once or in stages);
* :mod:`~vlmprune.seams.decode`: ``generate`` (a method's own decoding loop, e.g. speculative);
* :mod:`~vlmprune.seams.extra_layers`: a method's computation spliced into chosen decoder layers;
* :mod:`~vlmprune.seams.scope`: the per-call context all of them share.
"""
