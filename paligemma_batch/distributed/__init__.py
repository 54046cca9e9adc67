"""The Ray layer: the only code that imports ``ray``.

- :mod:`.stages`: the plain stage callables (read, preprocess, inference) as Ray Data runs them;
- :mod:`.sink`: the Datasink that commits part files through the Ray-free output store;
- :mod:`.pipeline`: starting or joining Ray, building the Dataset, and streaming it into the sink.
"""
