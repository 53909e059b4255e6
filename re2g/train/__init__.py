"""re2g.train"""
