"""fastcifar: a performance-tuned, high-throughput PyTorch trainer for CIFAR-10 and CIFAR-shaped data."""

__version__ = "0.1.0"
