"""Ray Serve application for re2g."""
