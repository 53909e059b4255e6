"""re2g.index"""
