"""VisionRay: train, tune and serve image-recognition CNNs on Ray."""

__version__ = "0.1.0"
