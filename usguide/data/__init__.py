"""Data sets, augmentation and rendered needles for training and evaluating usguide's models.

Only numpy, OpenCV and Pillow: no torch here, so evaluation and tests run without it.
"""
