"""re2g.data"""
