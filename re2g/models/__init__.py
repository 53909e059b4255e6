"""re2g.models"""
