"""Parts the methods share, none of them a method: the coreset, nearest-neighbour search, the foreground
estimate, anomaly-map post-processing, synthetic anomalies (Perlin noise, DefectMaker, generic images),
ELMES, the training loop, image loading and the one model folder (``persistence``).

Imports nothing itself, so loading one part never loads the others.
"""
