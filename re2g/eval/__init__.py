"""re2g.eval: retrieval and KILT metrics, reports."""
