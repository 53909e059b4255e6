"""re2g: Retrieve, Rerank, Generate (Glass et al., NAACL 2022) as a distributed system on Ray.

The library never calls ``ray.init``; entry points (``re2g`` CLI, ``jobs/``, ``serve/``) do.
"""

__version__ = "0.1.0"
