"""re2g.eval"""
